"""convert_checkpoint.py, upstream -> ours: identical numerics, complete folders, full-size dry runs, and loud,
loss-free failures. (Export: test_convert_export.py; fresh models: test_convert_components.py; untrusted and
broken input: test_convert_bad_input.py; progress bars: test_convert_progress.py.)"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from convert_helpers import (ATOL, assert_no_leftovers, converted, images, load, our_logits,  # noqa: F401
                             read_tensors, text_ids, upstream_config, write_upstream)
from safetensors.torch import load_file
from upstream_reference import (
    make_upstream_state_dict,
    spliced_input_ids,
    tiny_upstream_config,
    upstream_greedy,
    upstream_logits,
    write_upstream_checkpoint,
)

import convert_checkpoint as cc
import convert_upstream
import export_upstream
from checkpoint_io import ConversionError
from configuration_xcomposer import AUTO_MAP, XComposerConfig
from model_folder import CODE_FILES
from modeling_xcomposer import XComposerForCausalLM
from processing_xcomposer import CHAT_TEMPLATE_V1, CHAT_TEMPLATE_V2
from tokenization_internlm import InternLMTokenizer


@pytest.fixture(scope="module")
def models(converted):
    return {version: load(entry[3]) for version, entry in converted.items()}


# --------------------------------------------------------------------------- numerics of converted models


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("positions", [[], [3], [1, 5]], ids=["text", "one_image", "two_images"])
def test_converted_logits_equal_upstream(converted, models, version, positions):
    config, sd, _, _ = converted[version]
    ids, pixels = text_ids(version), images(len(positions))
    expected = upstream_logits(config, sd, ids, pixels, positions)
    torch.testing.assert_close(our_logits(models[version], ids, pixels, positions), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("version", [2, 1])
def test_greedy_generation_matches_upstream(converted, models, version):
    config, sd, _, _ = converted[version]
    model, ids, pixels = models[version], text_ids(10 + version), images(1)
    eos = model.generation_config.eos_token_id
    expected = upstream_greedy(config, sd, ids, pixels, [2], max_new_tokens=5, eos_ids=eos)
    spliced = spliced_input_ids(ids, [2], model.config.num_image_tokens, model.config.image_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=spliced, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert out[0, spliced.shape[1]:].tolist() == expected


@pytest.mark.parametrize("version", [2, 1])
def test_converted_folder_is_complete(converted, version):
    _, _, src, dst = converted[version]
    files = set(os.listdir(dst))
    assert set(CODE_FILES) <= files
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
            "processor_config.json", "preprocessor_config.json", "chat_template.jinja"} <= files
    assert "model.safetensors.index.json" not in files  # one shard: a plain model.safetensors
    assert_no_leftovers(dst.parent, [f"upstream_v{v}" for v in (1, 2)] + [f"ours_v{v}" for v in (1, 2)])

    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"] == json.loads(json.dumps(AUTO_MAP))
    assert config["model_type"] == "xcomposer" and config.get("dtype", config.get("torch_dtype")) == "float32"
    tokenizer = InternLMTokenizer(vocab_file=str(dst / "tokenizer.model"))
    end_of_turn = "[UNUSED_TOKEN_145]" if version == 2 else "<TOKENS_UNUSED_1>"
    eos = [2, tokenizer.sp_model.piece_to_id(end_of_turn)]
    assert eos[1] > 2 and config["text_config"]["eos_token_id"] == eos
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation.get("do_sample", False) is False  # 4.x omits defaults
    processor = json.loads((dst / "processor_config.json").read_text())
    assert json.loads((dst / "preprocessor_config.json").read_text())["image_size"] == 28  # every release reads it
    assert processor["num_image_tokens"] == (4 if version == 2 else 6)
    assert (dst / "chat_template.jinja").read_text() == (CHAT_TEMPLATE_V2 if version == 2 else CHAT_TEMPLATE_V1)
    if version == 1:  # upstream v1's two extra tokens sit right after the sentencepiece pieces, then the image id
        added = json.loads((dst / "added_tokens.json").read_text())
        assert added == {"<ITG_TOKEN>": 384, "<SOI_TOKEN>": 385, "<ImageHere>": 386}
        assert all(t.dtype == torch.float32 for t in read_tensors(dst).values())  # fp16/fp32 mix -> config's fp32


LOAD_SCRIPT = r"""
import runpy, sys, torch
script, src, dst, result = sys.argv[1:]
sys.argv = [script, src, dst]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True).float().eval()
processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
inputs = torch.load(dst + "/../inputs.pt")
with torch.no_grad():
    logits = model(inputs["ids"], pixel_values=inputs["pixels"]).logits
torch.save({"logits": logits, "module": type(model).__module__, "processor": type(processor).__module__,
            "num_image_tokens": processor.num_image_tokens}, result)
"""


@pytest.mark.slow
def test_cli_output_loads_through_auto_classes_offline(tmp_path):
    config, sd = write_upstream(tmp_path / "upstream", 2, seed=5)
    ids, pixels = text_ids(5), images(1)
    torch.save({"ids": spliced_input_ids(ids, [4], 4, 384), "pixels": pixels}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, os.path.join(ROOT, "convert_checkpoint.py"), str(tmp_path / "upstream"),
         str(tmp_path / "ours"), str(tmp_path / "result.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    params = sum(t.numel() for t in read_tensors(tmp_path / "ours").values())
    assert f"converted 70 tensors ({params:,} parameters) from XComposer2 to {tmp_path / 'ours'}" in run.stdout
    result = torch.load(tmp_path / "result.pt")
    assert result["module"].startswith("transformers_modules.")
    assert result["processor"].startswith("transformers_modules.")
    assert result["num_image_tokens"] == 4
    torch.testing.assert_close(result["logits"], upstream_logits(config, sd, ids, pixels, [4]), rtol=0, atol=ATOL)


def test_max_shard_size_splits_into_indexed_shards(converted, tmp_path):
    _, _, src, single = converted[2]
    assert cc.main([str(src), str(tmp_path / "sharded"), "--max-shard-size", "100KB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    expected, got = read_tensors(single), read_tensors(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for shard in shards:
        tensors = load_file(tmp_path / "sharded" / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 100_000
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())


def test_bf16_source_stays_bf16_and_dtype_flag_overrides(tmp_path):
    config = tiny_upstream_config(2)  # torch_dtype bfloat16
    write_upstream(tmp_path / "bf16", 2, config=config, dtype=torch.bfloat16)
    assert cc.main([str(tmp_path / "bf16"), str(tmp_path / "default")]) == 0
    assert cc.main([str(tmp_path / "bf16"), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    bf16, fp32 = read_tensors(tmp_path / "default"), read_tensors(tmp_path / "fp32")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    assert all(torch.equal(fp32[k], bf16[k].float()) for k in bf16)
    saved = json.loads((tmp_path / "default" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"  # torch_dtype before transformers 4.56
    # Without torch_dtype in config.json, the tensors' dominant floating dtype decides.
    del config["torch_dtype"]
    write_upstream(tmp_path / "no_dtype", 2, config=config, dtype=torch.bfloat16)
    assert cc.main([str(tmp_path / "no_dtype"), str(tmp_path / "guessed")]) == 0
    assert {t.dtype for t in read_tensors(tmp_path / "guessed").values()} == {torch.bfloat16}


def test_source_without_tokenizer_still_gives_a_loadable_folder(tmp_path, capsys):
    config = upstream_config(2)
    write_upstream_checkpoint(tmp_path / "src", config, make_upstream_state_dict(config))
    assert cc.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "no tokenizer" in capsys.readouterr().err
    files = set(os.listdir(tmp_path / "dst"))
    assert "tokenizer.model" not in files and "preprocessor_config.json" in files
    # The end-of-turn id then follows the full-size rule (92542), which a 384-token vocabulary cannot hold.
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["text_config"]["eos_token_id"] == [2]
    assert load(tmp_path / "dst").config.num_image_tokens == 4


@pytest.mark.parametrize("preset", ["xcomposer2-vl-7b", "xcomposer2-7b", "xcomposer-vl-7b"])
def test_full_size_presets_map_to_the_documented_upstream_shapes(preset):
    """At 7B, as dry runs on the meta device: our layout -> upstream's -> the same configuration and shapes back."""
    config = XComposerConfig.from_preset(preset)
    upstream, shapes = export_upstream.dry_run(config, lora_rank=256)
    back, ours = convert_upstream.dry_run(upstream, shapes)
    for key in ("vision_config", "text_config", "qformer_config"):
        if getattr(config, key) is None:
            assert getattr(back, key) is None
            continue
        expected, got = getattr(config, key).to_dict(), getattr(back, key).to_dict()
        expected.pop("eos_token_id", None), got.pop("eos_token_id", None)  # set from the tokenizer on writing
        assert got == expected, key
    with torch.device("meta"):
        model = XComposerForCausalLM(config)
    assert ours == {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.connector == "mlp2x_gelu":
        assert shapes["model.layers.31.attention.wqkv.weight"] == (6144, 4096)
        assert shapes["model.layers.0.attention.wqkv.Plora_B.weight"] == (6144, 256)
        assert shapes["model.layers.0.feed_forward.w2.Plora_A.weight"] == (256, 14336)
        rows = 1226 if preset == "xcomposer2-vl-7b" else 257
        assert shapes["vit.vision_tower.vision_model.embeddings.position_embedding.weight"] == (rows, 1024)
        assert (back.vision_config.num_attention_heads, back.text_config.num_key_value_heads) == (16, 8)
    else:
        assert shapes["visual_encoder.pos_embed"] == (1, 257, 1408)
        assert "visual_encoder.blocks.38.norm1.weight" in shapes  # depth 39
        assert "visual_encoder.blocks.39.norm1.weight" not in shapes
        assert shapes["Qformer.bert.encoder.layer.10.crossattention.self.key.weight"] == (768, 1408)
        assert "Qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in shapes
        assert shapes["internlm_model.model.layers.0.mlp.down_proj.lora_A.weight"] == (256, 11008)
        assert (back.vision_config.num_attention_heads, back.qformer_config.num_attention_heads) == (16, 12)
        assert back.num_image_tokens == 66


# --------------------------------------------------------------------------- failures are loud and lose nothing


def _add_unknown(sd, _):
    sd["model.layers.0.attention.extra.weight"] = torch.ones(2)
    return ["model.layers.0.attention.extra.weight"]


def _drop(name):
    def edit(sd, _):
        del sd[name]
        return [name]
    return edit


def _bad_shape(sd, _):
    sd["model.layers.0.ffn_norm.weight"] = torch.ones(63)
    return ["model.layers.0.ffn_norm.weight"]


def _truncate(_, folder):
    shard = folder / "pytorch_model-00002-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return [str(shard)]


def _index_names_missing_file(_, folder):
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["output.weight"] = "pytorch_model-00003-of-00003.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return ["pytorch_model-00003-of-00003.bin"]


def _unsafe_pickle(_, folder):
    marker = folder / "pwned"
    torch.save({"evil": Evil(marker)}, folder / "pytorch_model-00002-of-00002.bin")
    return ["pytorch_model-00002-of-00002.bin"]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: run code on unpickling
        return pathlib.Path.touch, (self.marker,)


UPSTREAM_CLIP_LAYER_1 = "vit.vision_tower.vision_model.encoder.layers.1."
FAILURES = {
    "unknown_tensor": (2, _add_unknown, None),
    "missing_tensor": (2, _drop("model.layers.1.feed_forward.w2.Plora_B.weight"), None),
    "missing_part_of_fused_qkv": (2, _drop(UPSTREAM_CLIP_LAYER_1 + "self_attn.k_proj.bias"), None),
    "missing_v1_lora_matrix": (1, _drop("internlm_model.model.layers.0.self_attn.q_proj.lora_B.weight"), None),
    "shape_mismatch": (2, _bad_shape, None),
    "truncated_shard": (2, None, _truncate),
    "index_names_missing_file": (2, None, _index_names_missing_file),
    "unsafe_pickle": (2, None, _unsafe_pickle),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_checkpoint_fails_loudly_and_writes_nothing(tmp_path, capsys, case):
    version, edit_sd, edit_files = FAILURES[case]
    config = upstream_config(version)
    sd = make_upstream_state_dict(config)
    names = edit_sd(sd, None) if edit_sd else []
    write_upstream(tmp_path / "src", version, sd=sd, config=config)
    names = edit_files(None, tmp_path / "src") if edit_files else names
    (tmp_path / "out").mkdir()

    assert cc.main([str(tmp_path / "src"), str(tmp_path / "out" / "dst")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert all(name in err for name in names), err
    assert_no_leftovers(tmp_path / "out")
    assert not (tmp_path / "src" / "pwned").exists()
    with pytest.raises(ConversionError) as info:
        convert_upstream.convert_upstream(tmp_path / "src", tmp_path / "out" / "dst")
    assert isinstance(info.value, ValueError) and all(any(n in m for m in info.value.names) for n in names)


def test_existing_destination_needs_force(converted, tmp_path, capsys):
    src = converted[2][2]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert cc.main([str(src), str(dst)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    assert cc.main([str(src), str(dst), "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert_no_leftovers(tmp_path, ["dst"])


def test_failure_while_writing_removes_the_temporary_folder_and_keeps_the_old_destination(converted, tmp_path,
                                                                                          monkeypatch):
    src = converted[2][2]

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_upstream, "write_folder_files", disk_full)  # fails after every shard was written
    with pytest.raises(OSError, match="disk full"):
        convert_upstream.convert_upstream(src, tmp_path / "dst")
    assert_no_leftovers(tmp_path)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("precious")
    with pytest.raises(OSError, match="disk full"):
        convert_upstream.convert_upstream(src, tmp_path / "dst", force=True)
    assert_no_leftovers(tmp_path, ["dst"])
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]
