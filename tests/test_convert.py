"""convert_checkpoint.py: upstream -> ours with identical numerics, ours -> upstream bit-exact round trips,
fresh models from raw components, and loud, loss-free failures."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config
from safetensors.torch import load_file
from tiny_sp import tiny_sp_path
from upstream_reference import (
    make_upstream_state_dict,
    spliced_input_ids,
    tiny_upstream_config,
    upstream_greedy,
    upstream_logits,
    write_upstream_checkpoint,
)

import convert_checkpoint as cc
from configuration_xcomposer import AUTO_MAP, XComposerConfig
from model_folder import CODE_FILES
from modeling_xcomposer import XComposerForCausalLM
from processing_xcomposer import CHAT_TEMPLATE_V1, CHAT_TEMPLATE_V2
from tokenization_internlm import InternLMTokenizer

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
    return XComposerForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_no_leftovers(parent, expected=()):
    assert sorted(os.listdir(parent)) == sorted(expected), os.listdir(parent)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both generations written in the upstream layout and converted once: {version: (config, sd, src, dst)}."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for version in (2, 1):
        config, sd = write_upstream(root / f"upstream_v{version}", version, seed=version)
        dst = root / f"ours_v{version}"
        assert cc.main([str(root / f"upstream_v{version}"), str(dst)]) == 0
        out[version] = config, sd, root / f"upstream_v{version}", dst
    return out


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
    assert config["model_type"] == "xcomposer" and config["dtype"] == "float32"
    tokenizer = InternLMTokenizer(vocab_file=str(dst / "tokenizer.model"))
    end_of_turn = "[UNUSED_TOKEN_145]" if version == 2 else "<TOKENS_UNUSED_1>"
    eos = [2, tokenizer.sp_model.piece_to_id(end_of_turn)]
    assert eos[1] > 2 and config["text_config"]["eos_token_id"] == eos
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation["do_sample"] is False
    processor = json.loads((dst / "processor_config.json").read_text())
    assert processor["image_processor"]["image_size"] == 28
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
model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
inputs = torch.load(dst + "/../inputs.pt")
with torch.no_grad():
    logits = model(inputs["ids"], pixel_values=inputs["pixels"]).logits
torch.save({"logits": logits, "module": type(model).__module__, "processor": type(processor).__module__,
            "num_image_tokens": processor.num_image_tokens}, result)
"""


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
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "bfloat16"
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


class ShapesOnly:
    """A checkpoint that has shapes but no tensors: enough to plan a conversion on the meta device."""

    path = "shapes"

    def __init__(self, shapes):
        self.specs = {name: (shape, torch.bfloat16) for name, shape in shapes.items()}


@pytest.mark.parametrize("preset", ["xcomposer2-vl-7b", "xcomposer2-7b", "xcomposer-vl-7b"])
def test_full_size_presets_map_to_the_documented_upstream_shapes(preset):
    """At 7B, planned on the meta device: our layout -> upstream's -> the same configuration back."""
    config = XComposerConfig.from_preset(preset)
    view = cc.ExportView(ShapesOnly(cc.expected_shapes(config)), config, lora_rank=256)
    version = 1 if config.connector == "perceive_sampler" else 2
    upstream = cc.upstream_config(view.config, torch.bfloat16, 256)
    shapes, _ = cc.plan([(view, cc.upstream_rules(version, upstream, view.config).inverse())])
    back = cc.derive_config(version, upstream, ShapesOnly(shapes).specs)
    assert cc._structure(back) == cc._structure(view.config)
    cc.plan([(ShapesOnly(shapes), cc.upstream_rules(version, upstream, back))], cc.expected_shapes(back))
    if version == 2:
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


# --------------------------------------------------------------------------- ours -> upstream


@pytest.mark.parametrize("version", [2, 1])
def test_round_trip_ours_upstream_ours_is_bit_exact(converted, tmp_path, version):
    config, sd, _, ours = converted[version]
    assert cc.main(["--to", "upstream", str(ours), str(tmp_path / "upstream"), "--lora-rank", "4"]) == 0
    assert cc.main([str(tmp_path / "upstream"), str(tmp_path / "again")]) == 0

    before, after = read_tensors(ours), read_tensors(tmp_path / "again")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    config_before = XComposerConfig.from_pretrained(ours).to_dict()
    config_after = XComposerConfig.from_pretrained(tmp_path / "again").to_dict()
    for key in ("connector", "image_token_id", "vision_config", "text_config", "qformer_config"):
        assert config_before[key] == config_after[key], key

    # The export is upstream's own format: the independent reference computes the original numbers from it.
    exported = tmp_path / "upstream"
    assert {"config.json", "pytorch_model.bin.index.json", "tokenizer.model"} <= set(os.listdir(exported))
    upstream = json.loads((exported / "config.json").read_text())
    assert upstream["model_type"] == ("internlmxcomposer2" if version == 2 else "InternLMXComposer")
    exported_sd = read_upstream_bins(exported)
    if version == 1:  # merged weights, zero LoRA matrices of the declared rank where upstream code looks for them
        assert upstream["internlm_lora"]["lora_r"] == 4
        lora = {k: v for k, v in exported_sd.items() if ".lora_" in k}
        assert len(lora) == 2 * 4 * 2 and all(not v.any() for v in lora.values())
        assert exported_sd["internlm_model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (4, 64)
    ids, pixels = text_ids(), images(1)
    torch.testing.assert_close(upstream_logits(upstream, exported_sd, ids, pixels, [3]),
                               upstream_logits(config, sd, ids, pixels, [3]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["v2_partial_lora_scaling_2", "v2_without_adapters", "v1_plain_lora"])
def test_export_merges_plain_lora_folds_scaling_and_adds_zero_adapters(converted, tmp_path, case):
    """v1's unmerged plain LoRA is merged; XComposer2's Partial LoRA scaling 2 is folded into B; a model
    without adapters gets zero PLoRA matrices, since upstream XComposer2 always has them."""
    version = 1 if case.startswith("v1") else 2
    ours = converted[version][3]
    config = XComposerConfig.from_pretrained(ours)
    config.text_config.lora_rank, config.text_config.lora_alpha = (0 if "without" in case else 4), 8.0
    if version == 1:
        config.text_config.lora_scope, config.text_config.lora_targets = "all", ["wqkv", "wo", "w1", "w2", "w3"]
    model = XComposerForCausalLM(config).eval()
    model.load_state_dict(read_tensors(ours), strict=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".A.weight", ".B.weight")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(tmp_path / "lora")
    assert cc.main(["--to", "upstream", str(tmp_path / "lora"), str(tmp_path / "upstream"), "--lora-rank", "2"]) == 0
    upstream = json.loads((tmp_path / "upstream" / "config.json").read_text())
    exported = read_upstream_bins(tmp_path / "upstream")
    if case == "v2_without_adapters":
        plora = [v for k, v in exported.items() if ".Plora_" in k]
        assert len(plora) == 2 * 5 * 2 and all(v.shape[0] == 2 or v.shape[1] == 2 for v in plora)
        assert not any(v.any() for v in plora)
    ids, pixels = text_ids(), images(2)
    torch.testing.assert_close(upstream_logits(upstream, exported, ids, pixels, [2, 6]),
                               our_logits(model, ids, pixels, [2, 6]), rtol=0, atol=ATOL)


def test_export_refuses_a_model_upstream_cannot_express(tmp_path):
    model = XComposerForCausalLM(tiny_config(2))  # CLIP head size 32: upstream derives heads = width / 64
    model.save_pretrained(tmp_path / "ours")
    (tmp_path / "out").mkdir()
    with pytest.raises(cc.ConversionError, match="vision_config.num_attention_heads"):
        cc.export_upstream(tmp_path / "ours", tmp_path / "out" / "upstream")
    assert_no_leftovers(tmp_path / "out")


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
    with pytest.raises(cc.ConversionError) as info:
        cc.convert_upstream(tmp_path / "src", tmp_path / "out" / "dst")
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

    monkeypatch.setattr(cc, "write_model_files", disk_full)  # fails after every shard was written
    with pytest.raises(OSError, match="disk full"):
        cc.convert_upstream(src, tmp_path / "dst")
    assert_no_leftovers(tmp_path)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("precious")
    with pytest.raises(OSError, match="disk full"):
        cc.convert_upstream(src, tmp_path / "dst", force=True)
    assert_no_leftovers(tmp_path, ["dst"])
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]


# --------------------------------------------------------------------------- a fresh model from raw components


def _internlm2_llm(folder, seed=0):
    """An InternLM2 checkpoint in the HF remote-code layout, from the decoder part of a tiny v2 state dict."""
    config = upstream_config(2)
    sd = make_upstream_state_dict(config, seed=seed)
    llm = {k: v for k, v in sd.items() if k.startswith(("model.", "output.")) and ".Plora_" not in k}
    llm_config = {k: v for k, v in config.items() if k != "img_size"}
    llm_config.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"])
    write_upstream_checkpoint(folder, llm_config, llm, n_shards=2, tokenizer_model_path=tiny_sp_path(2))
    return config, sd


def position_table(clip):
    return getattr(clip, "vision_model", clip).embeddings.position_embedding.weight  # transformers 5 flattened it


def _clip_vision(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14)).eval()
    with torch.no_grad():  # make the position table non-trivial so interpolation is visible
        position_table(clip).normal_()
    clip.save_pretrained(folder)
    return clip


def test_components_v2_fresh_model_keeps_llm_and_clip_numerics(tmp_path):
    config, sd = _internlm2_llm(tmp_path / "llm")
    clip = _clip_vision(tmp_path / "clip")
    common = ["--from-components", "--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "clip")]
    assert cc.main(common + ["--plora-rank", "4", "--img-size", "42", str(tmp_path / "at42")]) == 0
    assert cc.main(common + [str(tmp_path / "at28")]) == 0

    model = load(tmp_path / "at42")
    assert model.config.text_config.lora_rank == 4 and model.config.num_image_tokens == 9
    ids = text_ids()
    torch.testing.assert_close(our_logits(model, ids, None, []), upstream_logits(config, sd, ids, lora=False),
                               rtol=0, atol=ATOL)
    # Position table: CLS row kept, the 2x2 patch grid resized bicubic (align_corners=False) to 3x3.
    table = position_table(clip).detach()
    grid = F.interpolate(table[1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2), size=(3, 3), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(9, 64)
    torch.testing.assert_close(model.model.vision_tower.embeddings.pos_embed[0], torch.cat([table[:1], grid]), rtol=0, atol=1e-6)
    # Fresh parts come from our model's init: PLoRA B zero (identity at start), A and the projector random.
    state = model.state_dict()
    b = [v for k, v in state.items() if k.endswith(".B.weight")]
    a = [v for k, v in state.items() if k.endswith(".A.weight")]
    assert len(b) == len(a) == 10 and all(not t.any() for t in b) and all(t.std() > 0 for t in a)
    assert a[0].shape == (4, 64) and 0.01 < state["model.vision_proj.0.weight"].std() < 0.03
    assert model(spliced_input_ids(ids, [2], 9, 384), pixel_values=images(1, 42)).logits.isfinite().all()

    default = load(tmp_path / "at28")
    assert default.config.text_config.lora_rank == 256 and default.config.vision_config.image_size == 28
    pixels = images(2)
    with torch.no_grad():
        expected = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(default.model.vision_tower(pixels), expected, rtol=0, atol=ATOL)


def test_components_v1_fresh_model_from_eva_qformer_and_internlm(tmp_path):
    config = upstream_config(1)
    sd = make_upstream_state_dict(config, seed=4)
    eva = {k: v for k, v in sd.items() if k.startswith(("visual_encoder.", "ln_vision."))}
    qformer = {k: v for k, v in sd.items() if k.startswith("Qformer.") or k == "query_tokens"}
    qformer |= {"Qformer.cls.predictions.bias": torch.zeros(3), "temp": torch.ones(()),  # BLIP-2 extras, unused
                "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(3, 128)}
    torch.save(eva, tmp_path / "eva.pth")
    torch.save({"model": qformer}, tmp_path / "blip2.pth")  # LAVIS wraps its state dict
    llm = {k.removeprefix("internlm_model."): v for k, v in sd.items()
           if k.startswith("internlm_model.") and ".lora_" not in k}
    llm_config = {k: v for k, v in config.items() if k not in ("internlm_lora", "num_query_token")}
    llm_config.update(model_type="internlm", architectures=["InternLMForCausalLM"])
    write_upstream_checkpoint(tmp_path / "llm", llm_config, llm, tokenizer_model_path=tiny_sp_path(1))

    assert cc.main(["--from-components", "--llm", str(tmp_path / "llm"), "--eva", str(tmp_path / "eva.pth"),
                    "--qformer", str(tmp_path / "blip2.pth"), str(tmp_path / "ours")]) == 0
    model = load(tmp_path / "ours")
    ids = text_ids(vocab=386)
    torch.testing.assert_close(our_logits(model, ids, None, []), upstream_logits(config, sd, ids, lora=False),
                               rtol=0, atol=ATOL)
    state = model.state_dict()
    assert torch.equal(state["model.perceive_sampler.layers.0.cross_attn.key.weight"],
                       sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(state["model.vision_tower.blocks.1.attn.v_bias"], sd["visual_encoder.blocks.1.attn.v_bias"])
    assert torch.equal(state["model.vision_tower.post_norm.weight"], sd["ln_vision.weight"])
    flag = state["model.perceive_sampler.flag_image_start"]
    assert flag.shape == (1, 1, 64) and 0.005 < flag.std() < 0.05  # fresh, from our init
    assert model(spliced_input_ids(ids, [1], 6, 386), pixel_values=images(1)).logits.isfinite().all()
