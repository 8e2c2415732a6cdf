"""Shared pieces of the converter tests (tests/test_convert*.py): tiny upstream checkpoints, reading what the
converter wrote, and the `converted` fixture (both generations converted once per test module)."""

import hashlib
import json
import os
import pathlib
import stat

import pytest
import torch
from safetensors.torch import load_file
from tiny_sp import tiny_sp_path
from upstream_reference import make_upstream_state_dict, spliced_input_ids, tiny_upstream_config
from upstream_reference import write_upstream_checkpoint

import convert_checkpoint
from modeling_xcomposer import XComposerForCausalLM
from transformers_compat import DTYPE_ARG

ATOL = 1e-5
TEXT_LEN = 7
V1_FP16 = ("internlm_model.", "proj.weight")  # like upstream's fp16/fp32 mix: decoder projections in fp16


def upstream_config(version, **overrides):
    """Tiny upstream config in fp32; v1's vocabulary is the 384 tokenizer pieces + <ITG_TOKEN>, <SOI_TOKEN>."""
    extra = {"vocab_size": 386} if version == 1 else {}
    return tiny_upstream_config(version, **{"torch_dtype": "float32", **extra, **overrides})


def write_upstream(folder, version, sd=None, seed=0, **kwargs):
    """A tiny upstream checkpoint (2 .bin shards + index + tokenizer.model).
    Returns (config, the state dict as stored, in fp32)."""
    config = kwargs.pop("config", None) or upstream_config(version)
    sd = make_upstream_state_dict(config, seed=seed) if sd is None else sd
    if version == 1 and "dtype" not in kwargs:
        def mixed(name, _):
            return torch.float16 if name.startswith(V1_FP16[0]) and name.endswith(V1_FP16[1]) else None
        kwargs["dtype"] = mixed
        sd = {k: v.half().float() if k.startswith(V1_FP16[0]) and k.endswith(V1_FP16[1]) else v for k, v in sd.items()}
    write_upstream_checkpoint(folder, config, sd, tokenizer_model_path=tiny_sp_path(version), **kwargs)
    return config, sd


def text_ids(seed=0, vocab=384):
    ids = torch.randint(3, vocab, (1, TEXT_LEN), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 1
    return ids


def images(n, size=28, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) if n else None


def our_logits(model, ids, pixels, positions):
    config = model.config
    spliced = spliced_input_ids(ids, positions, config.num_image_tokens, config.image_token_id)
    with torch.no_grad():
        return model(spliced, pixel_values=pixels).logits


def read_tensors(folder):
    folder = pathlib.Path(folder)
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out |= load_file(folder / shard)
    return out


def read_upstream_bins(folder):
    index = json.loads((pathlib.Path(folder) / "pytorch_model.bin.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out |= torch.load(pathlib.Path(folder) / shard, weights_only=True)
    return out


def load(folder):
    return XComposerForCausalLM.from_pretrained(folder, **{DTYPE_ARG: torch.float32}).eval()


def assert_no_leftovers(parent, expected=()):
    assert sorted(os.listdir(parent)) == sorted(expected), os.listdir(parent)


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file below `folder` (links not followed): to show a source untouched."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[key] = f"link -> {os.readlink(path)}"
            elif stat.S_ISREG(mode):
                out[key] = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
            else:  # a FIFO or a device: never opened, it might block
                out[key] = f"special file {stat.S_IFMT(mode):o}"
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both generations written in the upstream layout and converted once: {version: (config, sd, src, dst)}."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for version in (2, 1):
        config, sd = write_upstream(root / f"upstream_v{version}", version, seed=version)
        dst = root / f"ours_v{version}"
        assert convert_checkpoint.main([str(root / f"upstream_v{version}"), str(dst)]) == 0
        out[version] = config, sd, root / f"upstream_v{version}", dst
    return out
