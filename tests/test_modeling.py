"""The model itself: Partial LoRA, the image splice, caching, batching, attention backends, sizes, errors."""

import pytest
import torch
from conftest import build_model, image_ids, tiny_config

from modeling_xcomposer import PartialLoRALinear, XComposerForCausalLM
from transformers_compat import CACHE_FIELD


def prompt(config, text_a, num_images, text_b):
    return [1, *text_a, *image_ids(config, num_images), *text_b]


def pixels(config, n, seed=0):
    size = config.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_partial_lora_adds_low_rank_term_to_image_rows_only():
    torch.manual_seed(0)
    layer = PartialLoRALinear(8, 6, bias=True, rank=2, alpha=4.0)
    torch.nn.init.normal_(layer.B.weight)
    x = torch.randn(2, 5, 8)
    image_mask = torch.zeros(2, 5, dtype=torch.bool)
    image_mask[0, 1:3] = image_mask[1, 4] = True
    out = layer(x, image_mask.flatten().nonzero().squeeze(1))
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    low_rank = x @ layer.A.weight.T @ layer.B.weight.T * 2.0
    torch.testing.assert_close(out[~image_mask], base[~image_mask], rtol=0, atol=0)
    torch.testing.assert_close(out[image_mask], (base + low_rank)[image_mask])
    assert not torch.allclose(out[image_mask], base[image_mask])
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # no image rows: no low-rank work


def test_plain_lora_acts_on_every_row():
    torch.manual_seed(0)
    layer = PartialLoRALinear(8, 6, bias=False, rank=2, alpha=2.0, all_rows=True)
    torch.nn.init.normal_(layer.B.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ (layer.weight + layer.B.weight @ layer.A.weight).T)


def test_text_only_input_matches_plain_decoder():
    model = build_model(2)
    plain = build_model(2, lora_rank=0)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False), None
    assert all(k.endswith((".A.weight", ".B.weight")) for k in missing.unexpected_keys)
    assert not missing.missing_keys
    ids = torch.tensor([[1, 17, 45, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_partial_lora_only_changes_outputs_from_the_first_image_token_on():
    model = build_model(2)
    plain = build_model(2, lora_rank=0)
    plain.load_state_dict(model.state_dict(), strict=False)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21, 22], 1, [30, 31])])
    px = pixels(cfg, 1)
    with torch.no_grad():
        a, b = model(ids, pixel_values=px).logits, plain(ids, pixel_values=px).logits
    first_image = 4  # BOS + 3 text tokens
    torch.testing.assert_close(a[:, :first_image], b[:, :first_image], rtol=0, atol=0)
    assert (a[:, first_image:] - b[:, first_image:]).abs().amax() > 1e-4


def test_image_features_land_at_image_token_positions(version):
    model = build_model(version)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20], 2, [30])])
    px = pixels(cfg, 2)
    with torch.no_grad():
        features = model.get_image_features(px).pooler_output
        out = model.model(ids, pixel_values=px, output_hidden_states=True)
    assert features.shape == (2, cfg.num_image_tokens, cfg.text_config.hidden_size)
    embeds = out.hidden_states[0][0]
    torch.testing.assert_close(embeds[2:2 + 2 * cfg.num_image_tokens], features.flatten(0, 1))
    torch.testing.assert_close(out.image_hidden_states, features)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_cached_generation_equals_uncached(version, num_images):
    model = build_model(version)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21], num_images, [30, 31, 32])])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                  pixel_values=pixels(cfg, num_images) if num_images else None)
    with_cache = model.generate(**kwargs, use_cache=True)
    without = model.generate(**kwargs, use_cache=False)
    assert with_cache.shape == (1, ids.shape[1] + 8)
    assert torch.equal(with_cache, without)


def test_cached_forward_equals_full_forward(version):
    model = build_model(version)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31, 32, 33, 34])])
    px = pixels(cfg, 1)
    with torch.no_grad():
        full = model(ids, pixel_values=px).logits
        split = ids.shape[1] - 3
        first = model(ids[:, :split], pixel_values=px, use_cache=True)
        rest = model(ids[:, split:], past_key_values=getattr(first, CACHE_FIELD), use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_each_prompt_alone(version):
    model = build_model(version)
    cfg = model.config
    prompts = [prompt(cfg, [20, 21, 22, 23, 24], 1, [30]), prompt(cfg, [40], 1, [50, 51]),
               prompt(cfg, [60, 61], 0, [70, 71, 72])]
    images = [pixels(cfg, 1, seed=1), pixels(cfg, 1, seed=2)]
    singles = []
    for p, px in zip(prompts, images + [None]):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                             max_new_tokens=6, min_new_tokens=6, do_sample=False)
        singles.append(out[0, len(p):].tolist())
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images),
                           max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert batch[:, width:].tolist() == singles


def test_eager_and_sdpa_agree(version):
    eager, sdpa = build_model(version, attn="eager"), build_model(version, attn="sdpa")
    cfg = eager.config
    assert cfg.vision_config._attn_implementation == "eager" and cfg.text_config._attn_implementation == "eager"
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31, 32]), prompt(cfg, [40, 41, 42], 1, [50, 51])])
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    px = pixels(cfg, 2)
    with torch.no_grad():
        a = eager(ids, pixel_values=px, attention_mask=mask).logits
        b = sdpa(ids, pixel_values=px, attention_mask=mask).logits
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=1e-5, atol=1e-5)


def test_labels_give_shifted_loss_ignoring_masked_positions():
    model = build_model(2)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31, 32])])
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    px = pixels(cfg, 1)
    with torch.no_grad():
        out = model(ids, pixel_values=px, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100])
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_same_loss_and_gradients(version):
    def loss_and_grads(checkpointing):
        model = build_model(version).train()
        if checkpointing:
            model.gradient_checkpointing_enable()  # every release's name (5.24 also calls it activation_...)
        cfg = model.config
        ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31, 32])])
        out = model(ids, pixel_values=pixels(cfg, 1), labels=ids.masked_fill(ids == cfg.image_token_id, -100))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any("vision_tower" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def _count(config):
    with torch.device("meta"):
        model = XComposerForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def test_full_size_v2_builds_on_meta_with_expected_parameter_count():
    from configuration_xcomposer import XComposerConfig

    config = XComposerConfig.from_preset("xcomposer2-vl-7b")
    t, v = config.text_config, config.vision_config
    d, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    r = t.lora_rank
    plora = lambda i, o: r * (i + o)  # noqa: E731
    layer = (d * (d + 2 * kv) + plora(d, d + 2 * kv) + d * d + plora(d, d)
             + 3 * d * t.intermediate_size + 2 * plora(d, t.intermediate_size) + plora(t.intermediate_size, d) + 2 * d)
    decoder = 2 * t.vocab_size * d + t.num_hidden_layers * layer + d
    w = v.hidden_size
    block = 4 * w * w + 4 * w + 2 * w * v.intermediate_size + v.intermediate_size + w + 4 * w
    vision = 3 * w * 14 * 14 + w + (v.num_patches + 1) * w + 2 * w + v.num_hidden_layers * block
    projector = w * d + d + d * d + d
    total = _count(config)
    assert total == decoder + vision + projector
    assert 8.5e9 < total < 8.7e9  # "about 8.6 B incl. PLoRA and vision"


def test_full_size_v1_builds_on_meta_with_expected_parameter_count():
    from configuration_xcomposer import XComposerConfig

    config = XComposerConfig.from_preset("xcomposer-vl-7b")
    t, q = config.text_config, config.qformer_config
    d = t.hidden_size
    layer = 4 * d * d + 4 * d + 3 * d * t.intermediate_size + 2 * d
    decoder = 2 * t.vocab_size * d + t.num_hidden_layers * layer + d
    w, m = 1408, 6144
    eva = 3 * w * 14 * 14 + w + w + 257 * w + 39 * (4 * w * w + 3 * w + 2 * w * m + m + w + 4 * w) + 2 * w
    h = q.hidden_size

    def attention(ctx):
        return h * h + h + 2 * (ctx * h + h) + h * h + h + 2 * h

    ffn = 2 * h * q.intermediate_size + q.intermediate_size + h + 2 * h
    qformer = 64 * h + 2 * h + 12 * (attention(h) + ffn) + 6 * attention(w)
    sampler = qformer + h * d + d + 2 * d
    total = _count(config)
    assert total == decoder + eva + sampler
    assert 8.3e9 < total < 8.5e9  # InternLM-7B with a 103k vocabulary, EVA ViT-g (39 blocks), Q-Former


def test_root_config_is_the_full_size_xcomposer2_vl_7b():
    from transformers import AutoConfig

    from conftest import ROOT

    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    assert config.model_type == "xcomposer" and config.num_image_tokens == 1225
    assert config.vision_config.image_size == 490 and config.text_config.num_key_value_heads == 8
    assert set(config.auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer",
                                    "AutoProcessor"}


@pytest.mark.parametrize("bad, message", [
    (dict(image_size=30), "divisible by patch_size"),
    (dict(hidden_size=60, num_attention_heads=7), "must divide hidden_size"),
])
def test_invalid_vision_config_is_rejected(bad, message):
    from configuration_xcomposer import XComposerConfig

    with pytest.raises(ValueError, match=message):
        XComposerConfig(vision_config=bad)


def test_invalid_text_config_is_rejected():
    from configuration_xcomposer import XComposerConfig

    with pytest.raises(ValueError, match="num_key_value_heads"):
        XComposerConfig(text_config=dict(num_attention_heads=32, num_key_value_heads=5))
    with pytest.raises(ValueError, match="image_token_id must be a non-negative integer"):
        XComposerConfig(text_config=dict(vocab_size=100), image_token_id=-1)


def test_image_count_mismatch_is_a_clear_error(version):
    model = build_model(version)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20], 2, [30])])
    with pytest.raises(ValueError, match=r"hold \d+ image tokens but 1 images"):
        model(ids, pixel_values=pixels(cfg, 1))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)


def test_wrong_pixel_shape_is_a_clear_error():
    model = build_model(2)
    ids = torch.tensor([prompt(model.config, [20], 1, [30])])
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 28, 28\)"):
        model(ids, pixel_values=torch.randn(1, 3, 32, 32))


def test_sequence_longer_than_maximum_is_a_clear_error():
    model = build_model(2)
    ids = torch.full((1, model.config.text_config.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="exceeds the maximum length"):
        model(ids)


def test_perceive_sampler_output_for_an_image_does_not_depend_on_the_batch():
    model = build_model(1)
    cfg = model.config
    px = pixels(cfg, 3)
    with torch.no_grad():
        batched = model.get_image_features(px).pooler_output
        alone = torch.cat([model.get_image_features(px[i:i + 1]).pooler_output for i in range(3)])
    assert batched.shape == (3, cfg.qformer_config.num_query_tokens + 2, cfg.text_config.hidden_size)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    sampler = model.model.perceive_sampler
    torch.testing.assert_close(batched[:, 0], sampler.flag_image_start[0].expand(3, -1))
    torch.testing.assert_close(batched[:, -1], sampler.flag_image_end[0].expand(3, -1))
    assert not sampler.flag_image_start.requires_grad  # frozen, as upstream


def test_qformer_cross_attends_every_second_layer_from_layer_0():
    from configuration_xcomposer import XComposerConfig

    config = XComposerConfig.from_preset("xcomposer-vl-7b")
    with torch.device("meta"):
        model = XComposerForCausalLM(config)
    crossing = [i for i, layer in enumerate(model.model.perceive_sampler.layers) if layer.cross_attn is not None]
    assert crossing == [0, 2, 4, 6, 8, 10] and config.num_image_tokens == 66


def test_v1_plain_lora_trains_as_adapters_and_merges_exactly():
    model = build_model(1, lora_rank=4, lora_alpha=8.0)
    cfg = model.config
    wqkv = model.model.language_model.layers[0].attention.wqkv
    assert wqkv.rank == 4 and wqkv.all_rows
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31])])
    px = pixels(cfg, 1)
    with torch.no_grad():
        before = model(ids, pixel_values=px).logits
        model.merge_lora()
        after = model(ids, pixel_values=px).logits
    assert cfg.text_config.lora_rank == 0 and not any(n.endswith(".A.weight") for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    plain = build_model(1)
    plain.load_state_dict(model.state_dict())  # the merged model is an ordinary v1 model


def test_partial_lora_refuses_to_merge():
    with pytest.raises(ValueError, match="Partial LoRA"):
        build_model(2).merge_lora()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_fp32(version, dtype):
    model = build_model(version)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31])])
    px = pixels(cfg, 1)
    with torch.no_grad():
        full = model(ids, pixel_values=px).logits
        half = model.to(dtype)(ids, pixel_values=px).logits
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_static_cache_decode_compiles_fullgraph_and_matches_dynamic_cache():
    CompileConfig = pytest.importorskip("transformers", reason="").__dict__.get("CompileConfig")
    if CompileConfig is None:
        pytest.skip("this transformers release has no CompileConfig: generate compiles no decode steps (4.48+)")

    model = build_model(2)
    cfg = model.config
    ids = torch.tensor([prompt(cfg, [20, 21], 1, [30, 31])])
    kwargs = dict(input_ids=ids, pixel_values=pixels(cfg, 1), attention_mask=torch.ones_like(ids),
                  max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless asked
    torch._dynamo.reset()
    compiled = model.generate(**kwargs, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(compiled, model.generate(**kwargs))


def test_adapters_missing_from_a_checkpoint_load_as_zero_b(tmp_path):
    plain = build_model(2, lora_rank=0)
    plain.save_pretrained(tmp_path)
    config = tiny_config(2)  # the same model with Partial LoRA of rank 4
    loaded = XComposerForCausalLM.from_pretrained(tmp_path, config=config).eval()
    assert loaded.model.language_model.layers[0].attention.wqkv.rank == 4
    assert all(p.abs().sum() == 0 for n, p in loaded.named_parameters() if n.endswith(".B.weight"))
    cfg = loaded.config
    ids = torch.tensor([prompt(cfg, [20], 1, [30, 31])])
    px = pixels(cfg, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=px).logits, plain(ids, pixel_values=px).logits)
