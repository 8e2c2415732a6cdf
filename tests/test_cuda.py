"""The CUDA fast paths equal the reference path within bf16 tolerance. Skipped without a GPU."""

import importlib.util

import pytest
import torch
from conftest import build_model, image_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_model(version=2, attn="sdpa", dtype=torch.bfloat16):
    return build_model(version, attn=attn).to("cuda", dtype)


def batch(config, device="cuda"):
    prompts = [[1, 20, 21, *image_ids(config), 30], [1, 40, *image_ids(config), 50, 51, 52, 53]]
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    size = config.vision_config.image_size
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    return ids, mask, px


def assert_same_logits_on_real_tokens(model_a, model_b):
    """Both models on one left-padded batch with images; padding positions are not compared."""
    ids, mask, px = batch(model_a.config)
    with torch.no_grad():
        a = model_a(ids, pixel_values=px, attention_mask=mask).logits
        b = model_b(ids, pixel_values=px, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real].float(), b[real].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("version", [2, 1])
def test_bf16_sdpa_matches_eager(version):
    assert_same_logits_on_real_tokens(cuda_model(version), cuda_model(version, attn="eager"))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_2_with_padding_matches_sdpa():
    flash = cuda_model(attn="flash_attention_2")
    assert_same_logits_on_real_tokens(flash, cuda_model())
    ids, mask, px = batch(flash.config)
    generated = flash.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8,
                               do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 8)


def test_compiled_static_cache_decode_matches_dynamic_cache():
    model = cuda_model(dtype=torch.float32)
    ids, mask, px = batch(model.config)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=px.float(), max_new_tokens=8, do_sample=False)
    reference = model.generate(**kwargs)
    compiled = model.generate(**kwargs, cache_implementation="static")  # generate compiles on CUDA by itself
    assert torch.equal(compiled, reference)
