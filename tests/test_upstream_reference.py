"""Self-checks of the independent upstream reference (tests/upstream_reference.py) itself."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from upstream_reference import (  # noqa: E402
    make_upstream_state_dict,
    spliced_image_mask,
    spliced_input_ids,
    tiny_upstream_config,
    upstream_greedy,
    upstream_logits,
    upstream_num_image_tokens,
    write_upstream_checkpoint,
)

VOCAB = 384
TEXT_LEN = 7


def _setup(version, seed=0):
    config = tiny_upstream_config(version)
    return config, make_upstream_state_dict(config, seed=seed)


def _inputs(n_images, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, TEXT_LEN), generator=g)
    ids[0, 0] = 1  # BOS
    images = torch.randn(n_images, 3, 28, 28, generator=g) if n_images else None
    return ids, images


def _with(sd, **replacements):
    out = dict(sd)
    out.update(replacements)
    return out


def _zero_low_rank(sd, marker):
    return _with(sd, **{k: torch.zeros_like(v) for k, v in sd.items() if marker in k})


# ---------------------------------------------------------------------------- configs and keys

def test_tiny_v1_config_and_key_shapes():
    config, sd = _setup(1)
    assert config["model_type"] == "InternLMXComposer"
    assert config["internlm_lora"]["lora_alpha"] / config["internlm_lora"]["lora_r"] == 2.0
    assert upstream_num_image_tokens(config, sd) == config["num_query_token"] + 2 == 6
    assert sd["visual_encoder.pos_embed"].shape == (1, 5, 176)
    assert sd["visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 176, 176)
    assert "visual_encoder.blocks.0.attn.qkv.bias" not in sd
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in sd
    assert not any(k.startswith("Qformer.bert.encoder.layer.1.crossattention") for k in sd)
    assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 176)
    assert sd["flag_image_start"].shape == (1, 1, 64)
    lora_keys = {k.split(".")[-3] for k in sd if ".lora_A." in k}
    assert lora_keys == {"q_proj", "v_proj", "up_proj", "down_proj"}
    assert sd["internlm_model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert sd["internlm_model.model.layers.0.self_attn.o_proj.bias"].shape == (64,)
    assert "internlm_model.model.layers.1.self_attn.rotary_emb.inv_freq" in sd


def test_tiny_v2_config_and_key_shapes():
    config, sd = _setup(2)
    assert config["model_type"] == "internlmxcomposer2"
    assert upstream_num_image_tokens(config, sd) == 4
    vm = "vit.vision_tower.vision_model"
    assert sd[f"{vm}.embeddings.position_embedding.weight"].shape == (5, 128)
    # (4 query heads + 2 * 2 kv heads) * head_dim 16
    assert sd["model.layers.0.attention.wqkv.weight"].shape == (128, 64)
    assert sd["model.layers.0.attention.wqkv.Plora_B.weight"].shape == (128, 4)
    assert sd["model.layers.0.feed_forward.w2.Plora_A.weight"].shape == (4, 128)
    assert all(sd[k].abs().sum() > 0 for k in sd if "Plora_B" in k)
    assert not any(".bias" in k for k in sd if k.startswith("model."))
    assert "model.layers.0.attention.rotary_emb.inv_freq" in sd
    extras = make_upstream_state_dict(config, include_extras=False)
    assert set(sd) - set(extras) == {
        f"{vm}.embeddings.position_ids", f"{vm}.post_layernorm.weight", f"{vm}.post_layernorm.bias",
        "model.layers.0.attention.rotary_emb.inv_freq", "model.layers.1.attention.rotary_emb.inv_freq"}


# ---------------------------------------------------------------------------- forward shapes

@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("positions", [[], [0], [3], [TEXT_LEN], [1, 1], [2, 5]])
def test_logits_shape_and_finite(version, positions):
    config, sd = _setup(version)
    ids, images = _inputs(len(positions))
    logits = upstream_logits(config, sd, ids, images, positions)
    n_tok = upstream_num_image_tokens(config, sd)
    assert logits.shape == (1, TEXT_LEN + len(positions) * n_tok, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert 0.1 < logits.std() < 10  # O(1), not saturated


def test_bad_image_positions_raise():
    config, sd = _setup(2)
    ids, images = _inputs(2)
    with pytest.raises(ValueError):
        upstream_logits(config, sd, ids, images, [1])
    with pytest.raises(ValueError):
        upstream_logits(config, sd, ids, images, [5, 2])
    with pytest.raises(ValueError):
        upstream_logits(config, sd, ids, images, [1, TEXT_LEN + 1])


def test_spliced_ids_and_mask_agree():
    ids, _ = _inputs(0)
    out = spliced_input_ids(ids, [0, 3, 3], 4, image_token_id=999)
    mask = spliced_image_mask(TEXT_LEN, [0, 3, 3], 4)
    assert out.shape == mask.shape == (1, TEXT_LEN + 12)
    assert torch.equal(out == 999, mask)
    assert torch.equal(out[~mask], ids[0])
    assert mask[0, :4].all() and not mask[0, 4] and mask[0, 7:15].all()


# ---------------------------------------------------------------------------- v2 PLoRA

def test_v2_zero_plora_b_equals_no_plora():
    config, sd = _setup(2)
    ids, images = _inputs(2)
    zeroed = upstream_logits(config, _zero_low_rank(sd, "Plora_B"), ids, images, [1, 4])
    ignored = upstream_logits(config, sd, ids, images, [1, 4], lora=False)
    assert torch.allclose(zeroed, ignored, atol=1e-6, rtol=0)


def test_v2_text_only_is_independent_of_plora():
    config, sd = _setup(2)
    other = make_upstream_state_dict(config, seed=1)
    swapped = _with(sd, **{k: v for k, v in other.items() if "Plora" in k})
    ids, _ = _inputs(0)
    reference = upstream_logits(config, sd, ids, None, [])
    assert torch.equal(upstream_logits(config, swapped, ids, None, []), reference)
    assert torch.equal(upstream_logits(config, sd, ids, None, [], lora=False), reference)


def test_v2_plora_acts_from_the_first_image_row_on():
    config, sd = _setup(2)
    ids, images = _inputs(1)
    with_plora = upstream_logits(config, sd, ids, images, [3])
    without = upstream_logits(config, sd, ids, images, [3], lora=False)
    assert torch.allclose(with_plora[:, :3], without[:, :3], atol=1e-6, rtol=0)
    assert (with_plora[:, 3:] - without[:, 3:]).abs().amax(-1).min() > 1e-3


def test_v2_kv_group_layout_is_self_consistent():
    # Permuting whole KV groups (and query slots inside a group) of the packed wqkv, together
    # with the matching wo input columns, must not change anything. A [Q; K; V] reading of
    # the packed rows would mix roles and fail this.
    config, sd = _setup(2)
    kv, heads, hd = config["num_key_value_heads"], config["num_attention_heads"], 16
    q_per_kv = heads // kv
    group_perm, slot_perm = torch.tensor([1, 0]), torch.tensor([1, 0, 2, 3])
    permuted = dict(sd)
    for i in range(config["num_hidden_layers"]):
        for name in ("wqkv.weight", "wqkv.Plora_B.weight"):
            key = f"model.layers.{i}.attention.{name}"
            w = sd[key].view(kv, q_per_kv + 2, hd, -1)[group_perm][:, slot_perm]
            permuted[key] = w.reshape(sd[key].shape)
        for name in ("wo.weight", "wo.Plora_A.weight"):
            key = f"model.layers.{i}.attention.{name}"
            w = sd[key].view(-1, kv, q_per_kv, hd)[:, group_perm][:, :, slot_perm[:q_per_kv]]
            permuted[key] = w.reshape(sd[key].shape)
    ids, images = _inputs(1)
    a = upstream_logits(config, sd, ids, images, [2])
    b = upstream_logits(config, permuted, ids, images, [2])
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- v1 LoRA

def test_v1_zero_lora_b_equals_no_lora():
    config, sd = _setup(1)
    ids, images = _inputs(1)
    zeroed = upstream_logits(config, _zero_low_rank(sd, "lora_B"), ids, images, [2])
    ignored = upstream_logits(config, sd, ids, images, [2], lora=False)
    assert torch.allclose(zeroed, ignored, atol=1e-6, rtol=0)


def test_v1_lora_acts_on_text_tokens():
    config, sd = _setup(1)
    ids, _ = _inputs(0)
    diff = upstream_logits(config, sd, ids, None, []) - upstream_logits(config, sd, ids, None, [], lora=False)
    assert diff.abs().amax(-1).min() > 1e-3


def test_v1_lora_merges_exactly_with_alpha_over_r():
    config, sd = _setup(1)
    scaling = config["internlm_lora"]["lora_alpha"] / config["internlm_lora"]["lora_r"]
    merged = dict(sd)
    for key in [k for k in sd if k.endswith(".lora_A.weight")]:
        base = key[: -len(".lora_A.weight")]
        merged[base + ".weight"] = sd[base + ".weight"] + scaling * sd[base + ".lora_B.weight"] @ sd[key]
    ids, images = _inputs(1)
    a = upstream_logits(config, sd, ids, images, [2])
    b = upstream_logits(config, merged, ids, images, [2], lora=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- causality

@pytest.mark.parametrize("version", [1, 2])
def test_later_token_does_not_change_earlier_logits(version):
    config, sd = _setup(version)
    ids, images = _inputs(1)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % VOCAB
    a = upstream_logits(config, sd, ids, images, [2])
    b = upstream_logits(config, sd, changed, images, [2])
    row = 5 + upstream_num_image_tokens(config, sd)  # spliced index of text token 5
    assert torch.allclose(a[:, :row], b[:, :row], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, row], b[:, row])


@pytest.mark.parametrize("version", [1, 2])
def test_image_changes_only_its_rows_and_later(version):
    config, sd = _setup(version)
    ids, images = _inputs(1)
    a = upstream_logits(config, sd, ids, images, [4])
    b = upstream_logits(config, sd, ids, torch.randn_like(images), [4])
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("version", [1, 2])
def test_greedy_length_determinism_and_first_token(version):
    config, sd = _setup(version)
    ids, images = _inputs(1)
    out = upstream_greedy(config, sd, ids, images, [1], max_new_tokens=4, eos_ids=None)
    assert len(out) == 4 and all(isinstance(t, int) for t in out)
    assert out == upstream_greedy(config, sd, ids, images, [1], 4, None)
    assert out[0] == int(upstream_logits(config, sd, ids, images, [1])[0, -1].argmax())
    # stops right after an eos id, which is included
    assert upstream_greedy(config, sd, ids, images, [1], 4, eos_ids=[out[1]]) == out[:2]
    assert upstream_greedy(config, sd, ids, images, [1], 4, eos_ids=out[0]) == out[:1]


# ---------------------------------------------------------------------------- checkpoint files

def test_write_upstream_checkpoint_roundtrip(tmp_path):
    config, sd = _setup(2)
    tok = tmp_path / "src.model"
    tok.write_bytes(b"sentencepiece")
    folder = tmp_path / "upstream"
    files = write_upstream_checkpoint(folder, config, sd, n_shards=2, dtype=torch.bfloat16,
                                      tokenizer_model_path=tok)
    assert files == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert json.loads((folder / "config.json").read_text()) == config
    assert (folder / "tokenizer.model").read_bytes() == b"sentencepiece"
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    loaded = {}
    for f in files:
        loaded.update(torch.load(folder / f, weights_only=True))
    assert set(loaded) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    for k, t in loaded.items():
        assert t.shape == sd[k].shape
        if sd[k].is_floating_point():
            assert t.dtype == torch.bfloat16 and torch.equal(t, sd[k].to(torch.bfloat16))
        else:
            assert torch.equal(t, sd[k])


# ---------------------------------------------------------------------------- vs. transformers
# Independent implementations of the same building blocks agree with the reference. The
# weight renames below are written for transformers 5.24 and only serve these checks.

def test_clip_tower_matches_transformers_clip_vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from upstream_reference import _clip_vit

    config, sd = _setup(2)
    prefix = "vit.vision_tower.vision_model."
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("vision_model.") for k in clip.state_dict()):  # the key layout of transformers < 5
        weights = {"vision_model." + k: v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if k in clip.state_dict()}  # position_ids: a buffer, or none
    clip.load_state_dict(weights, strict=True)
    image = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = clip(image, output_hidden_states=True).hidden_states[-1][0, 1:]
    assert torch.allclose(_clip_vit(sd, image[0]), expected, atol=1e-5, rtol=0)


def test_eva_tower_matches_transformers_blip2_vision_model():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from upstream_reference import _eva_vit

    config, sd = _setup(1)
    eva = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=176, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)).eval()
    ve = "visual_encoder."
    weights = {
        "embeddings.class_embedding": sd[ve + "cls_token"],
        "embeddings.position_embedding": sd[ve + "pos_embed"],
        "embeddings.patch_embedding.weight": sd[ve + "patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": sd[ve + "patch_embed.proj.bias"],
    }
    renames = [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
               ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    for i in range(2):
        src, dst = f"{ve}blocks.{i}.", f"encoder.layers.{i}."
        for a, b in renames:
            weights[dst + b + ".weight"] = sd[src + a + ".weight"]
            weights[dst + b + ".bias"] = sd[src + a + ".bias"]
        weights[dst + "self_attn.qkv.weight"] = sd[src + "attn.qkv.weight"]
        q_bias, v_bias = sd[src + "attn.q_bias"], sd[src + "attn.v_bias"]
        weights[dst + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    missing, unexpected = eva.load_state_dict(weights, strict=False)
    assert set(missing) == {"post_layernorm.weight", "post_layernorm.bias"} and not unexpected
    image = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = eva(image, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(_eva_vit(sd, image[0]), expected, atol=1e-5, rtol=0)


def test_qformer_matches_transformers_blip2_qformer():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from upstream_reference import _qformer

    config, sd = _setup(1)
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        encoder_hidden_size=176, cross_attention_frequency=2, layer_norm_eps=1e-12,
        hidden_act="gelu", use_qformer_text_input=False)).eval()
    prefix = "Qformer.bert."
    weights = {}
    for k, v in sd.items():
        if k.startswith(prefix) and not k.endswith("position_ids"):
            name = k[len(prefix):].replace("embeddings.LayerNorm", "layernorm").replace(".self.", ".attention.")
            weights[name] = v
    qformer.load_state_dict(weights, strict=True)
    vision = torch.randn(5, 176)
    with torch.no_grad():
        expected = qformer(query_embeds=sd["query_tokens"], encoder_hidden_states=vision[None]).last_hidden_state[0]
    assert torch.allclose(_qformer(sd, vision), expected, atol=1e-5, rtol=0)


def _llama(vocab, kv_heads, rope_theta, bias, weights):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
        rope_theta=rope_theta, attention_bias=bias, mlp_bias=False, tie_word_embeddings=False)).eval()
    model.load_state_dict(weights, strict=True)
    return model


def test_v1_decoder_matches_transformers_llama_with_merged_lora():
    config, sd = _setup(1)
    scaling = config["internlm_lora"]["lora_alpha"] / config["internlm_lora"]["lora_r"]
    weights = {}
    for k, v in sd.items():
        if not k.startswith("internlm_model.") or ".lora_" in k or "inv_freq" in k:
            continue
        base = k[: -len(".weight")]
        if k.endswith(".weight") and base + ".lora_A.weight" in sd:
            v = v + scaling * sd[base + ".lora_B.weight"] @ sd[base + ".lora_A.weight"]
        weights[k[len("internlm_model."):]] = v
    llama = _llama(VOCAB, 4, 10000.0, True, weights)
    ids, _ = _inputs(0)
    with torch.no_grad():
        expected = llama(ids).logits
    assert torch.allclose(upstream_logits(config, sd, ids, None, []), expected, atol=1e-5, rtol=0)


def test_v2_decoder_text_matches_transformers_llama_with_ungrouped_wqkv():
    config, sd = _setup(2)
    weights = {"model.embed_tokens.weight": sd["model.tok_embeddings.weight"],
               "model.norm.weight": sd["model.norm.weight"], "lm_head.weight": sd["output.weight"]}
    for i in range(2):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = sd[src + "attention.wqkv.weight"].view(2, 4, 16, 64)  # (kv groups, 2 q + k + v, d, in)
        weights[dst + "self_attn.q_proj.weight"] = wqkv[:, :2].reshape(64, 64)
        weights[dst + "self_attn.k_proj.weight"] = wqkv[:, 2].reshape(32, 64)
        weights[dst + "self_attn.v_proj.weight"] = wqkv[:, 3].reshape(32, 64)
        weights[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        weights[dst + "mlp.gate_proj.weight"] = sd[src + "feed_forward.w1.weight"]
        weights[dst + "mlp.up_proj.weight"] = sd[src + "feed_forward.w3.weight"]
        weights[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        weights[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        weights[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    llama = _llama(VOCAB, 2, float(config["rope_theta"]), False, weights)
    ids, _ = _inputs(0)
    with torch.no_grad():
        expected = llama(ids).logits
    assert torch.allclose(upstream_logits(config, sd, ids, None, []), expected, atol=1e-5, rtol=0)
