"""Converting XComposer-2.5 / 4KHD checkpoints: the format is found by the tile separators, every tensor is
mapped, OmniLive's video-memory projector is ignored with a note, the behaviour follows the tile size, the export
goes back bit for bit, and the command-line contract: `python convert_checkpoint.py SRC DST`, then AutoProcessor
and AutoModelForCausalLM from DST, `processor(text=..., images=[...], hd_num=N)`, `model(**inputs)` and
`model.generate(**inputs)`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from convert_helpers import read_tensors, read_upstream_bins
from PIL import Image
from tiny_sp import tiny_sp_path
from upstream_reference import write_upstream_checkpoint
from upstream_reference_hd import (hd_greedy, hd_logits, hd_preprocess, hd_prompt_rows, make_upstream_hd_state_dict,
                                   tiny_upstream_hd_config)

import convert_checkpoint
import convert_upstream
import export_upstream
from configuration_xcomposer import XComposerConfig
from conftest import ROOT
from modeling_xcomposer import XComposerForCausalLM

TILE = 56
DERIVED = ("rotary_emb.inv_freq", "position_ids", "post_layernorm", "video_mem_proj.")


def write(folder, seed=0, video_mem=False, **config_overrides):
    config = tiny_upstream_hd_config(**config_overrides)
    sd = make_upstream_hd_state_dict(config, seed=seed, tile=TILE, video_mem=video_mem)
    write_upstream_checkpoint(folder, config, sd, tokenizer_model_path=tiny_sp_path(2))
    return config, sd


def test_conversion_maps_every_tensor_ignores_video_memory_and_goes_back_bit_for_bit(tmp_path, capsys):
    _, sd = write(tmp_path / "up", seed=1, video_mem=True)
    assert convert_checkpoint.main([str(tmp_path / "up"), str(tmp_path / "ours")]) == 0
    captured = capsys.readouterr()
    assert "note: ignoring 4 tensors video_mem_proj.0.bias" in captured.err
    assert "from XComposer-2.5 / 4KHD to" in captured.out
    ours = read_tensors(tmp_path / "ours")
    assert torch.equal(ours["model.tile_layout.glb_GN"], sd["plora_glb_GN"])
    assert torch.equal(ours["model.tile_layout.sub_GN"], sd["plora_sub_GN"])
    assert not any(name.startswith("video_mem_proj") for name in ours)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    hd = (config["hd_num"], config["hd_num_multi"], config["hd_padding"], config["hd_clamp"])
    assert hd == (24, 6, "bottom", True)
    assert config["text_config"]["rope_dynamic_factor"] == 2.0 and config["vision_config"]["image_size"] == TILE

    assert convert_checkpoint.main(["--to", "upstream", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = read_upstream_bins(tmp_path / "back")
    kept = {k: v for k, v in sd.items() if not any(part in k for part in DERIVED)}
    assert sorted(back) == sorted(kept)
    assert all(torch.equal(back[k], kept[k]) for k in kept)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"] == {"type": "dynamic",
                                                                                          "factor": 2.0}
    assert convert_checkpoint.main([str(tmp_path / "back"), str(tmp_path / "again")]) == 0
    again = read_tensors(tmp_path / "again")
    assert sorted(again) == sorted(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_the_tile_size_chooses_the_upstream_behaviour_and_sizes_come_from_the_tensors():
    """Full size, as dry runs on the meta device: 560 px tiles are XComposer-2.5, 336 px XComposer2-4KHD."""
    for preset, tile, behaviour in (("xcomposer2d5-7b", 560, (24, 6, "bottom", True)),
                                    ("xcomposer2-4khd-7b", 336, (25, 25, "center", False))):
        config = XComposerConfig.from_preset(preset)
        upstream, shapes = export_upstream.dry_run(config, lora_rank=256)
        assert shapes["plora_glb_GN"] == (1, 1, 4096) and shapes["plora_sub_GN"] == (1, 1, 1, 4096)
        assert shapes["vision_proj.0.weight"] == (4096, 4096)
        rows = (tile // 14) ** 2 + 1
        assert shapes["vit.vision_tower.vision_model.embeddings.position_embedding.weight"] == (rows, 1024)
        back, planned = convert_upstream.dry_run(upstream, shapes)
        assert (back.hd_num, back.hd_num_multi, back.hd_padding, back.hd_clamp) == behaviour
        assert back.vision_config.image_size == tile and back.vision_config.hidden_size == 1024
        assert back.text_config.to_dict() | {"eos_token_id": None} == config.text_config.to_dict() | {
            "eos_token_id": None}
        with torch.device("meta"):
            model = XComposerForCausalLM(config)
        assert planned == {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_a_projector_that_does_not_take_merged_tokens_is_an_error(tmp_path, capsys):
    config = tiny_upstream_hd_config()
    sd = make_upstream_hd_state_dict(config, tile=TILE)
    sd["vision_proj.0.weight"] = sd["vision_proj.0.weight"][:, :128]
    write_upstream_checkpoint(tmp_path / "up", config, sd, tokenizer_model_path=tiny_sp_path(2))
    assert convert_checkpoint.main([str(tmp_path / "up"), str(tmp_path / "ours")]) == 1
    assert "error: vision_proj.0.weight takes 128 features, but the tile separators need 4 x the CLIP width 128" in (
        capsys.readouterr().err)
    assert not (tmp_path / "ours").exists()


CHILD = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
dst, out = sys.argv[1], sys.argv[2]
processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True).float().eval()
spec = json.load(open(out + ".json"))
images = [Image.open(path) for path in spec["images"]]
inputs = processor(text=spec["prompt"], images=images, hd_num=spec["hd_num"])
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "generated": generated, "input_ids": inputs["input_ids"],
            "image_token_id": model.config.image_token_id, "grid": inputs["image_grid"],
            "classes": [type(model).__module__, type(processor).__name__]}, out)
"""


@pytest.mark.slow
def test_command_line_contract_convert_then_auto_classes(tmp_path):
    config, sd = write(tmp_path / "up", seed=2, video_mem=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), str(tmp_path / "up"),
                          str(tmp_path / "dst")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(150, 60), (50, 120)]):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    prompt = ("[UNUSED_TOKEN_146]user\nFirst <ImageHere> then <ImageHere>?[UNUSED_TOKEN_145]\n"
              "[UNUSED_TOKEN_146]assistant\n")
    (tmp_path / "out.pt.json").write_text(json.dumps({"prompt": prompt, "images": paths, "hd_num": 3}))
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "dst"), str(tmp_path / "out.pt")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["classes"][0].startswith("transformers_modules") and got["classes"][1] == "XComposerHDProcessor"
    ids = got["input_ids"][0]
    is_image = (ids == got["image_token_id"]).int()
    assert int((is_image[1:] - is_image[:-1]).clamp(min=0).sum()) == 2  # one consecutive run per image

    from transformers import AutoTokenizer  # the reference builds the same prompt itself
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dst", trust_remote_code=True)
    tensors = [hd_preprocess(Image.open(p).convert("RGB"), 3, TILE, "bottom", True) for p in paths]
    rows, mask, _ = hd_prompt_rows(config, sd, lambda t, bos: tokenizer(t, add_special_tokens=bos)["input_ids"],
                                   prompt, tensors, TILE)
    assert torch.equal(ids == got["image_token_id"], mask)
    torch.testing.assert_close(got["logits"][0], hd_logits(config, sd, rows, mask), rtol=0, atol=1e-5)
    assert got["generated"][0, ids.shape[0]:].tolist() == hd_greedy(config, sd, rows, mask, 4)
