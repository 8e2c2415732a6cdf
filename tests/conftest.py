"""Tiny configurations shared by the tests. The repository root is importable as flat modules."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configuration_xcomposer import XComposerConfig  # noqa: E402

TINY_VOCAB = 384  # tests/tiny_sp.py's DEFAULT_VOCAB_SIZE


def tiny_config(version: int = 2, **text_overrides) -> XComposerConfig:
    """v2: 28 px CLIP (4 image tokens), GQA decoder with Partial LoRA of scaling 2.
    v1: 28 px EVA + Q-Former with 4 queries (6 image tokens), biased MHA decoder."""
    if version == 2:
        text = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
        return XComposerConfig(
            connector="mlp2x_gelu",
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14),
            text_config={**text, **text_overrides})
    text = dict(vocab_size=TINY_VOCAB + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=256,
                attention_bias=True, lora_rank=0, lora_scope="all", lora_targets=["wqkv", "w2", "w3"])
    return XComposerConfig(
        connector="perceive_sampler",
        vision_config=dict(variant="eva", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu",
                           layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=64, num_query_tokens=4),
        text_config={**text, **text_overrides})


def randomize_adapters(model, seed: int = 0) -> None:
    """Fresh models start with B = 0; give every low-rank adapter a non-zero B so it matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def build_model(version: int = 2, seed: int = 0, attn: str = "sdpa", **text_overrides):
    from modeling_xcomposer import XComposerForCausalLM

    config = tiny_config(version, **text_overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = XComposerForCausalLM(config).eval()
    randomize_adapters(model, seed)
    return model


def image_ids(config, num_images: int = 1) -> list[int]:
    return [config.image_token_id] * (config.num_image_tokens * num_images)


@pytest.fixture(params=[2, 1], ids=["v2", "v1"])
def version(request):
    return request.param
