"""convert_checkpoint.py --to upstream: ours -> the upstream layout and back bit for bit, adapters made
expressible (plain LoRA merged, scaling folded, zero PLoRA added), and models upstream cannot express refused."""

import json
import os

import pytest
import torch
from conftest import tiny_config
from convert_helpers import (ATOL, assert_no_leftovers, converted, images, our_logits, read_tensors,  # noqa: F401
                             read_upstream_bins, text_ids)
from upstream_reference import upstream_logits

import convert_checkpoint as cc
import export_upstream
from checkpoint_io import ConversionError
from configuration_xcomposer import XComposerConfig
from modeling_xcomposer import XComposerForCausalLM


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
    with pytest.raises(ConversionError, match="vision_config.num_attention_heads"):
        export_upstream.export_upstream(tmp_path / "ours", tmp_path / "out" / "upstream")
    assert_no_leftovers(tmp_path / "out")
