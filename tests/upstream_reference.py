"""An independent, deliberately plain re-statement of the upstream XComposer numerics.

Tests use it to prove that our model and `convert_checkpoint.py` reproduce what the
published upstream code computes. It follows only /work/shared/reference/UPSTREAM_FORMATS.md
and imports nothing from the repository's model code: only torch and the standard library.
Everything runs in float32, one sequence at a time, with explicit loops and no cache.

Public API
    tiny_upstream_config(version, **overrides) -> dict
    make_upstream_state_dict(config, seed=0, *, include_extras=True, **sizes) -> dict
    write_upstream_checkpoint(folder, config, state_dict, n_shards=2, dtype=None,
                              tokenizer_model_path=None) -> list[str]
    upstream_version(config) -> int
    upstream_num_image_tokens(config, sd) -> int
    clip_patch_features(sd, image) -> Tensor
    upstream_logits(config, sd, input_ids, images, image_positions, *, lora=True) -> Tensor
    upstream_greedy(config, sd, input_ids, images, image_positions, max_new_tokens,
                    eos_ids=None) -> list[int]
    spliced_input_ids(input_ids, image_positions, num_image_tokens, image_token_id) -> Tensor
    spliced_image_mask(length, image_positions, num_image_tokens) -> BoolTensor
"""

import json
import math
import os
import shutil

import torch
import torch.nn.functional as F

# Vision / connector sizes are fixed in upstream code (not in config.json); a converter
# derives them from tensor shapes. These are the tiny defaults used by make_upstream_state_dict.
# Every tower has 2 heads so that head splitting is exercised.
TINY_SIZES = {
    # v1: EVA ViT-g (heads = width // 88), image 28 px / patch 14 -> 4 patches + CLS
    "eva_width": 176,
    "eva_depth": 2,
    "eva_mlp": 128,
    "eva_image_size": 28,
    "eva_patch": 14,
    # v1: Q-Former (heads = hidden / 64), cross-attention in layers 0, 2, ...
    "qformer_hidden": 128,
    "qformer_layers": 2,
    "qformer_intermediate": 256,
    # v2: CLIP (heads = width / 64), image size comes from config["img_size"]
    "clip_width": 128,
    "clip_layers": 2,
    "clip_intermediate": 256,
    "clip_patch": 14,
    # v2: PLoRA rank (upstream fixes lora_alpha = rank, so the scaling is 1.0)
    "plora_rank": 4,
}

EVA_LN_EPS = 1e-6
LN_VISION_EPS = 1e-5
QFORMER_LN_EPS = 1e-12
CLIP_LN_EPS = 1e-5
QFORMER_CROSS_ATTENTION_FREQ = 2


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

def tiny_upstream_config(version, **overrides):
    """An upstream-style config.json dict at tiny size. version: 1 / 2 (or "v1" / "v2")."""
    version = _parse_version(version)
    if version == 1:
        config = {
            "architectures": ["InternLMXComposerForCausalLM"],
            "model_type": "InternLMXComposer",
            "bias": True,
            "kqvo_bias": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": -1,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "initializer_range": 0.02,
            "intern_converted_llm": True,
            "num_query_token": 4,
            "internlm_lora": {
                "lora_r": 4,
                "lora_alpha": 8,  # scaling 2.0: catches a converter that forgets alpha / r
                "lora_dropout": 0.05,
                "learn_param": ["q", "v", "ffn"],
            },
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": False,
            "vocab_size": 384,
        }
    else:
        config = {
            "architectures": ["InternLMXComposer2ForCausalLM"],
            "model_type": "internlmxcomposer2",
            "bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_length": 4096,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 1.0},
            "rms_norm_eps": 1e-5,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": False,
            "vocab_size": 384,
            "img_size": 28,
        }
    config.update(overrides)
    return config


def _parse_version(version):
    v = str(version).lower().lstrip("v")
    if v not in ("1", "2"):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return int(v)


def upstream_version(config):
    """1 for XComposer v1 (InternLMXComposer), 2 for XComposer2."""
    if config.get("model_type") == "InternLMXComposer" or "num_query_token" in config:
        return 1
    return 2


# ----------------------------------------------------------------------------------------
# Random upstream state dicts
# ----------------------------------------------------------------------------------------

class _Init:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, std=0.05):
        return torch.randn(*shape, generator=self.gen) * std

    def linear(self, sd, name, out_f, in_f, bias=True, std=None):
        std = std if std is not None else 1.0 / math.sqrt(in_f)
        sd[name + ".weight"] = self.randn(out_f, in_f, std=std)
        if bias:
            sd[name + ".bias"] = self.randn(out_f, std=0.05)

    def norm(self, sd, name, dim, bias=True):
        sd[name + ".weight"] = 1.0 + self.randn(dim, std=0.1)
        if bias:
            sd[name + ".bias"] = self.randn(dim, std=0.05)


def make_upstream_state_dict(config, seed=0, *, include_extras=True, **sizes):
    """Random fp32 tensors with exactly the upstream key names and shapes.

    include_extras adds what upstream files may carry besides weights: the derived buffers
    `*.rotary_emb.inv_freq` and `*.position_ids`, and (v2) the unused CLIP `post_layernorm`.
    sizes overrides entries of TINY_SIZES (vision / connector sizes).
    """
    unknown = set(sizes) - set(TINY_SIZES)
    if unknown:
        raise TypeError(f"unknown size overrides: {sorted(unknown)}")
    s = dict(TINY_SIZES, **sizes)
    init = _Init(seed)
    if upstream_version(config) == 1:
        return _make_v1(config, s, init, include_extras)
    return _make_v2(config, s, init, include_extras)


def _inv_freq(head_dim, base):
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _make_v1(config, s, init, include_extras):
    sd = {}
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    vocab = config["vocab_size"]
    kqvo_bias = config.get("kqvo_bias", True)
    r = config["internlm_lora"]["lora_r"]

    # EVA ViT-g
    W, p = s["eva_width"], s["eva_patch"]
    n_patches = (s["eva_image_size"] // p) ** 2
    ve = "visual_encoder"
    sd[f"{ve}.cls_token"] = init.randn(1, 1, W, std=0.5)
    sd[f"{ve}.pos_embed"] = init.randn(1, n_patches + 1, W, std=0.5)
    init.linear(sd, f"{ve}.patch_embed.proj", W, 3 * p * p, std=0.02)
    sd[f"{ve}.patch_embed.proj.weight"] = sd[f"{ve}.patch_embed.proj.weight"].reshape(W, 3, p, p)
    for i in range(s["eva_depth"]):
        b = f"{ve}.blocks.{i}"
        init.norm(sd, f"{b}.norm1", W)
        sd[f"{b}.attn.qkv.weight"] = init.randn(3 * W, W, std=1.0 / math.sqrt(W))
        sd[f"{b}.attn.q_bias"] = init.randn(W, std=0.1)
        sd[f"{b}.attn.v_bias"] = init.randn(W, std=0.1)
        init.linear(sd, f"{b}.attn.proj", W, W)
        init.norm(sd, f"{b}.norm2", W)
        init.linear(sd, f"{b}.mlp.fc1", s["eva_mlp"], W)
        init.linear(sd, f"{b}.mlp.fc2", W, s["eva_mlp"])
    init.norm(sd, "ln_vision", W)

    # Q-Former (query branch only)
    Hq, Iq = s["qformer_hidden"], s["qformer_intermediate"]
    init.norm(sd, "Qformer.bert.embeddings.LayerNorm", Hq)
    if include_extras:
        sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    for i in range(s["qformer_layers"]):
        b = f"Qformer.bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            init.linear(sd, f"{b}.attention.self.{proj}", Hq, Hq)
        init.linear(sd, f"{b}.attention.output.dense", Hq, Hq)
        init.norm(sd, f"{b}.attention.output.LayerNorm", Hq)
        if i % QFORMER_CROSS_ATTENTION_FREQ == 0:
            init.linear(sd, f"{b}.crossattention.self.query", Hq, Hq)
            init.linear(sd, f"{b}.crossattention.self.key", Hq, W)
            init.linear(sd, f"{b}.crossattention.self.value", Hq, W)
            init.linear(sd, f"{b}.crossattention.output.dense", Hq, Hq)
            init.norm(sd, f"{b}.crossattention.output.LayerNorm", Hq)
        init.linear(sd, f"{b}.intermediate_query.dense", Iq, Hq)
        init.linear(sd, f"{b}.output_query.dense", Hq, Iq)
        init.norm(sd, f"{b}.output_query.LayerNorm", Hq)
    sd["query_tokens"] = init.randn(1, config["num_query_token"], Hq, std=0.5)
    sd["flag_image_start"] = init.randn(1, 1, hidden, std=0.5)
    sd["flag_image_end"] = init.randn(1, 1, hidden, std=0.5)
    init.linear(sd, "internlm_proj", hidden, Hq)

    # InternLM decoder with LoRA on q, v, up, down
    m = "internlm_model.model"
    sd[f"{m}.embed_tokens.weight"] = init.randn(vocab, hidden, std=0.5)
    for i in range(config["num_hidden_layers"]):
        b = f"{m}.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            init.linear(sd, f"{b}.self_attn.{proj}_proj", hidden, hidden, bias=kqvo_bias)
        for proj in ("q", "v"):
            _lora(sd, init, f"{b}.self_attn.{proj}_proj", hidden, hidden, r, "lora_A", "lora_B")
        if include_extras:
            sd[f"{b}.self_attn.rotary_emb.inv_freq"] = _inv_freq(hidden // heads, 10000.0)
        init.linear(sd, f"{b}.mlp.gate_proj", inter, hidden, bias=False)
        init.linear(sd, f"{b}.mlp.up_proj", inter, hidden, bias=False)
        init.linear(sd, f"{b}.mlp.down_proj", hidden, inter, bias=False)
        _lora(sd, init, f"{b}.mlp.up_proj", inter, hidden, r, "lora_A", "lora_B")
        _lora(sd, init, f"{b}.mlp.down_proj", hidden, inter, r, "lora_A", "lora_B")
        init.norm(sd, f"{b}.input_layernorm", hidden, bias=False)
        init.norm(sd, f"{b}.post_attention_layernorm", hidden, bias=False)
    init.norm(sd, f"{m}.norm", hidden, bias=False)
    sd["internlm_model.lm_head.weight"] = init.randn(vocab, hidden, std=0.1)
    return sd


def _lora(sd, init, name, out_f, in_f, r, a_name, b_name):
    sd[f"{name}.{a_name}.weight"] = init.randn(r, in_f, std=1.0 / math.sqrt(in_f))
    sd[f"{name}.{b_name}.weight"] = init.randn(out_f, r, std=0.1)  # non-zero on purpose


def _make_v2(config, s, init, include_extras):
    sd = {}
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = hidden // heads
    vocab = config["vocab_size"]
    bias = config.get("bias", False)
    r = s["plora_rank"]

    # CLIP ViT
    W, p, I = s["clip_width"], s["clip_patch"], s["clip_intermediate"]
    n_pos = (config["img_size"] // p) ** 2 + 1
    vm = "vit.vision_tower.vision_model"
    sd[f"{vm}.embeddings.class_embedding"] = init.randn(W, std=0.5)
    sd[f"{vm}.embeddings.patch_embedding.weight"] = init.randn(W, 3, p, p, std=0.02)
    sd[f"{vm}.embeddings.position_embedding.weight"] = init.randn(n_pos, W, std=0.5)
    if include_extras:
        sd[f"{vm}.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    init.norm(sd, f"{vm}.pre_layrnorm", W)
    for i in range(s["clip_layers"]):
        b = f"{vm}.encoder.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            init.linear(sd, f"{b}.self_attn.{proj}_proj", W, W)
        init.norm(sd, f"{b}.layer_norm1", W)
        init.norm(sd, f"{b}.layer_norm2", W)
        init.linear(sd, f"{b}.mlp.fc1", I, W)
        init.linear(sd, f"{b}.mlp.fc2", W, I)
    if include_extras:
        init.norm(sd, f"{vm}.post_layernorm", W)  # present in some files, never used
    init.linear(sd, "vision_proj.0", hidden, W)
    init.linear(sd, "vision_proj.2", hidden, hidden)

    # InternLM2 decoder with PLoRA
    sd["model.tok_embeddings.weight"] = init.randn(vocab, hidden, std=0.5)
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}"
        init.norm(sd, f"{b}.attention_norm", hidden, bias=False)
        init.linear(sd, f"{b}.attention.wqkv", qkv_rows, hidden, bias=bias)
        _lora(sd, init, f"{b}.attention.wqkv", qkv_rows, hidden, r, "Plora_A", "Plora_B")
        init.linear(sd, f"{b}.attention.wo", hidden, heads * head_dim, bias=bias)
        _lora(sd, init, f"{b}.attention.wo", hidden, heads * head_dim, r, "Plora_A", "Plora_B")
        if include_extras:
            sd[f"{b}.attention.rotary_emb.inv_freq"] = _inv_freq(head_dim, float(config["rope_theta"]))
        init.norm(sd, f"{b}.ffn_norm", hidden, bias=False)
        for name, out_f, in_f in (("w1", inter, hidden), ("w3", inter, hidden), ("w2", hidden, inter)):
            init.linear(sd, f"{b}.feed_forward.{name}", out_f, in_f, bias=False)
            _lora(sd, init, f"{b}.feed_forward.{name}", out_f, in_f, r, "Plora_A", "Plora_B")
    init.norm(sd, "model.norm", hidden, bias=False)
    sd["output.weight"] = init.randn(vocab, hidden, std=0.1)
    return sd


# ----------------------------------------------------------------------------------------
# Writing an upstream-style checkpoint folder
# ----------------------------------------------------------------------------------------

def write_upstream_checkpoint(folder, config, state_dict, n_shards=2, dtype=None,
                              tokenizer_model_path=None):
    """config.json + torch.save'd .bin shards + pytorch_model.bin.index.json (+ tokenizer.model).

    dtype: None (keep), a torch.dtype for every floating tensor, or a callable
    (name, tensor) -> dtype or None, to write a mix like upstream's fp16/fp32 v1 files.
    Returns the shard file names.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    names = list(state_dict)
    n_shards = max(1, min(n_shards, len(names)))
    per_shard = math.ceil(len(names) / n_shards)
    weight_map, total_size, files = {}, 0, []
    for k in range(n_shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        shard = {}
        for name in names[k * per_shard:(k + 1) * per_shard]:
            t = state_dict[name].detach().clone().contiguous()  # clone: no shared storage
            target = dtype(name, t) if callable(dtype) else dtype
            if target is not None and t.is_floating_point():
                t = t.to(target)
            shard[name] = t
            weight_map[name] = fname
            total_size += t.numel() * t.element_size()
        torch.save(shard, os.path.join(folder, fname))
        files.append(fname)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if tokenizer_model_path is not None:
        shutil.copyfile(tokenizer_model_path, os.path.join(folder, "tokenizer.model"))
    return files


# ----------------------------------------------------------------------------------------
# Small shared pieces of math (all float32)
# ----------------------------------------------------------------------------------------

def _w(sd, name):
    return sd[name].float()


def _linear(sd, name, x, bias=True):
    b = _w(sd, name + ".bias") if bias else None
    return F.linear(x, _w(sd, name + ".weight"), b)


def _layer_norm(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), _w(sd, name + ".weight"), _w(sd, name + ".bias"), eps)


def _rms_norm(sd, name, x, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return _w(sd, name + ".weight") * (x.float() * torch.rsqrt(variance + eps))


def _split_heads(x, n_heads):
    # (L, n_heads * d) -> (n_heads, L, d)
    L = x.shape[0]
    return x.view(L, n_heads, -1).transpose(0, 1)


def _merge_heads(x):
    # (n_heads, L, d) -> (L, n_heads * d)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _attention(q, k, v, causal):
    """q (H, Lq, d), k/v (H, Lk, d) -> (H, Lq, d); softmax in fp32, scale d^-0.5."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        Lq, Lk = q.shape[1], k.shape[1]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    return probs @ v


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x, base):
    """x (H, L, d); positions 0..L-1 (upstream ignores position_ids); rotate-half style."""
    L, d = x.shape[1], x.shape[2]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    t = torch.arange(L, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)              # (L, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)       # (L, d)
    return x * emb.cos() + _rotate_half(x) * emb.sin()


# ----------------------------------------------------------------------------------------
# Image layout helpers
# ----------------------------------------------------------------------------------------

def _check_positions(image_positions, n_images, n_text):
    positions = list(image_positions or [])
    if len(positions) != n_images:
        raise ValueError(f"{n_images} images but {len(positions)} image positions")
    if positions != sorted(positions) or any(p < 0 or p > n_text for p in positions):
        raise ValueError(f"image positions must be sorted and in [0, {n_text}]: {positions}")
    return positions


def _splice(text_items, image_items, image_positions):
    """Insert image_items[i] (a list of rows) before text index image_positions[i].

    Returns the spliced list of rows and a parallel list of booleans (True = image row)."""
    rows, is_image = [], []
    for t in range(len(text_items) + 1):
        for i, p in enumerate(image_positions):
            if p == t:
                rows.extend(image_items[i])
                is_image.extend([True] * len(image_items[i]))
        if t < len(text_items):
            rows.append(text_items[t])
            is_image.append(False)
    return rows, is_image


def spliced_input_ids(input_ids, image_positions, num_image_tokens, image_token_id):
    """Our llava-style ids for the same layout: num_image_tokens image_token_ids per image."""
    ids = input_ids[0].tolist()
    positions = _check_positions(image_positions, len(image_positions or []), len(ids))
    images = [[image_token_id] * num_image_tokens for _ in positions]
    rows, _ = _splice(ids, images, positions)
    return torch.tensor([rows], dtype=torch.long)


def spliced_image_mask(length, image_positions, num_image_tokens):
    """(1, L') bool mask of image rows for a text length `length` and the given positions."""
    positions = _check_positions(image_positions, len(image_positions or []), length)
    images = [[None] * num_image_tokens for _ in positions]
    _, is_image = _splice([None] * length, images, positions)
    return torch.tensor([is_image], dtype=torch.bool)


def upstream_num_image_tokens(config, sd):
    """v1: 1 + num_query_token + 1; v2: (img_size / patch) ** 2."""
    if upstream_version(config) == 1:
        return config["num_query_token"] + 2
    patch = sd["vit.vision_tower.vision_model.embeddings.patch_embedding.weight"].shape[-1]
    return (config["img_size"] // patch) ** 2


# ----------------------------------------------------------------------------------------
# v1: EVA ViT-g -> ln_vision -> Q-Former -> internlm_proj -> [start, queries, end]
# ----------------------------------------------------------------------------------------

def _eva_vit(sd, image):
    """image (3, H, W) -> (N + 1, width): all tokens of the last block, no final norm."""
    ve = "visual_encoder"
    weight = _w(sd, f"{ve}.patch_embed.proj.weight")
    width, patch = weight.shape[0], weight.shape[-1]
    heads = width // 88  # upstream's rule: head_dim 88
    x = F.conv2d(image.float()[None], weight, _w(sd, f"{ve}.patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2)[0].transpose(0, 1)                          # (N, width)
    x = torch.cat([_w(sd, f"{ve}.cls_token")[0], x], dim=0)      # (N + 1, width)
    x = x + _w(sd, f"{ve}.pos_embed")[0]
    depth = _count_layers(sd, f"{ve}.blocks.")
    for i in range(depth):
        b = f"{ve}.blocks.{i}"
        h = _layer_norm(sd, f"{b}.norm1", x, EVA_LN_EPS)
        q_bias, v_bias = _w(sd, f"{b}.attn.q_bias"), _w(sd, f"{b}.attn.v_bias")
        qkv_bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # k has no bias
        qkv = F.linear(h, _w(sd, f"{b}.attn.qkv.weight"), qkv_bias)      # (N+1, 3*width)
        q, k, v = qkv.split(width, dim=-1)
        out = _attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                         causal=False)
        x = x + _linear(sd, f"{b}.attn.proj", _merge_heads(out))
        h = _layer_norm(sd, f"{b}.norm2", x, EVA_LN_EPS)
        x = x + _linear(sd, f"{b}.mlp.fc2", F.gelu(_linear(sd, f"{b}.mlp.fc1", h)))
    return x


def _bert_attention(sd, prefix, hidden, context, heads):
    """BERT attention block (post-LN): LayerNorm(hidden + dense(attn(hidden -> context)))."""
    q = _split_heads(_linear(sd, f"{prefix}.self.query", hidden), heads)
    k = _split_heads(_linear(sd, f"{prefix}.self.key", context), heads)
    v = _split_heads(_linear(sd, f"{prefix}.self.value", context), heads)
    out = _merge_heads(_attention(q, k, v, causal=False))
    out = _linear(sd, f"{prefix}.output.dense", out)
    return _layer_norm(sd, f"{prefix}.output.LayerNorm", out + hidden, QFORMER_LN_EPS)


def _qformer(sd, image_embeds):
    """image_embeds (N + 1, eva_width) -> (num_query, qformer_hidden)."""
    queries = _w(sd, "query_tokens")[0]
    heads = queries.shape[-1] // 64  # BERT-base head size
    x = _layer_norm(sd, "Qformer.bert.embeddings.LayerNorm", queries, QFORMER_LN_EPS)
    n_layers = _count_layers(sd, "Qformer.bert.encoder.layer.")
    for i in range(n_layers):
        b = f"Qformer.bert.encoder.layer.{i}"
        x = _bert_attention(sd, f"{b}.attention", x, x, heads)
        if f"{b}.crossattention.self.query.weight" in sd:
            x = _bert_attention(sd, f"{b}.crossattention", x, image_embeds, heads)
        h = F.gelu(_linear(sd, f"{b}.intermediate_query.dense", x))
        h = _linear(sd, f"{b}.output_query.dense", h)
        x = _layer_norm(sd, f"{b}.output_query.LayerNorm", h + x, QFORMER_LN_EPS)
    return x


def _v1_image_embeddings(sd, image):
    vit = _eva_vit(sd, image)
    vit = _layer_norm(sd, "ln_vision", vit, LN_VISION_EPS)
    queries = _linear(sd, "internlm_proj", _qformer(sd, vit))
    return torch.cat([_w(sd, "flag_image_start")[0], queries, _w(sd, "flag_image_end")[0]], dim=0)


# ----------------------------------------------------------------------------------------
# v2: CLIP ViT (last layer, CLS dropped) -> vision_proj
# ----------------------------------------------------------------------------------------

def _clip_vit(sd, image):
    """image (3, H, W) -> (N, width): last encoder layer's hidden states without CLS."""
    vm = "vit.vision_tower.vision_model"
    weight = _w(sd, f"{vm}.embeddings.patch_embedding.weight")
    width, patch = weight.shape[0], weight.shape[-1]
    heads = width // 64  # CLIP-L head size
    x = F.conv2d(image.float()[None], weight, None, stride=patch)
    x = x.flatten(2)[0].transpose(0, 1)                                          # (N, width)
    x = torch.cat([_w(sd, f"{vm}.embeddings.class_embedding")[None], x], dim=0)  # (N+1, width)
    x = x + _w(sd, f"{vm}.embeddings.position_embedding.weight")
    x = _layer_norm(sd, f"{vm}.pre_layrnorm", x, CLIP_LN_EPS)
    for i in range(_count_layers(sd, f"{vm}.encoder.layers.")):
        b = f"{vm}.encoder.layers.{i}"
        h = _layer_norm(sd, f"{b}.layer_norm1", x, CLIP_LN_EPS)
        q = _split_heads(_linear(sd, f"{b}.self_attn.q_proj", h), heads)
        k = _split_heads(_linear(sd, f"{b}.self_attn.k_proj", h), heads)
        v = _split_heads(_linear(sd, f"{b}.self_attn.v_proj", h), heads)
        x = x + _linear(sd, f"{b}.self_attn.out_proj", _merge_heads(_attention(q, k, v, causal=False)))
        h = _layer_norm(sd, f"{b}.layer_norm2", x, CLIP_LN_EPS)
        h = _linear(sd, f"{b}.mlp.fc1", h)
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + _linear(sd, f"{b}.mlp.fc2", h)
    return x[1:]


def clip_patch_features(sd, image):
    """XComposer2's CLIP tower: image (3, H, W) -> (N, width), the last layer without CLS (also what the HD
    models run on each view)."""
    return _clip_vit(sd, image)


def _v2_image_embeddings(sd, image):
    x = _clip_vit(sd, image)
    x = F.gelu(_linear(sd, "vision_proj.0", x))
    return _linear(sd, "vision_proj.2", x)


# ----------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------

def _count_layers(sd, prefix):
    indices = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous layer indices under {prefix}: {sorted(indices)}")
    return len(indices)


def _lora_linear(config, sd, name, x, bias, lora):
    """v1 LoRALinear: W x + b + (B A x) * lora_alpha / lora_r on every token."""
    y = _linear(sd, name, x, bias=bias)
    if lora:
        scaling = config["internlm_lora"]["lora_alpha"] / config["internlm_lora"]["lora_r"]
        y = y + F.linear(F.linear(x, _w(sd, f"{name}.lora_A.weight")), _w(sd, f"{name}.lora_B.weight")) * scaling
    return y


def _v1_decoder(config, sd, x, lora):
    """x (L, hidden) -> logits (L, vocab). InternLM-7B with q/k/v/o biases and LoRA."""
    m = "internlm_model.model"
    heads = config["num_attention_heads"]
    eps = config["rms_norm_eps"]
    bias = config.get("kqvo_bias", True)
    for i in range(config["num_hidden_layers"]):
        b = f"{m}.layers.{i}"
        h = _rms_norm(sd, f"{b}.input_layernorm", x, eps)
        q = _split_heads(_lora_linear(config, sd, f"{b}.self_attn.q_proj", h, bias, lora), heads)
        k = _split_heads(_linear(sd, f"{b}.self_attn.k_proj", h, bias=bias), heads)
        v = _split_heads(_lora_linear(config, sd, f"{b}.self_attn.v_proj", h, bias, lora), heads)
        q, k = _apply_rotary(q, 10000.0), _apply_rotary(k, 10000.0)
        out = _merge_heads(_attention(q, k, v, causal=True))
        x = x + _linear(sd, f"{b}.self_attn.o_proj", out, bias=bias)
        h = _rms_norm(sd, f"{b}.post_attention_layernorm", x, eps)
        gate = F.silu(_linear(sd, f"{b}.mlp.gate_proj", h, bias=False))
        up = _lora_linear(config, sd, f"{b}.mlp.up_proj", h, False, lora)
        x = x + _lora_linear(config, sd, f"{b}.mlp.down_proj", gate * up, False, lora)
    x = _rms_norm(sd, f"{m}.norm", x, eps)
    return F.linear(x, _w(sd, "internlm_model.lm_head.weight"))


def _plora_linear(sd, name, x, image_mask, bias, lora):
    """v2 PLoRA: W x for text rows, W x + B A x for image rows (scaling alpha / r = 1)."""
    y = _linear(sd, name, x, bias=bias)
    if lora:
        low_rank = F.linear(F.linear(x, _w(sd, f"{name}.Plora_A.weight")), _w(sd, f"{name}.Plora_B.weight"))
        y = y + low_rank * image_mask[:, None].float()
    return y


def _v2_decoder(config, sd, x, image_mask, lora):
    """x (L, hidden), image_mask (L,) -> logits (L, vocab). InternLM2 with GQA and PLoRA."""
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    q_per_kv = heads // kv_heads
    head_dim = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    base = float(config["rope_theta"])
    bias = config.get("bias", False)
    L = x.shape[0]
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}"
        h = _rms_norm(sd, f"{b}.attention_norm", x, eps)
        qkv = _plora_linear(sd, f"{b}.attention.wqkv", h, image_mask, bias, lora)
        # rows grouped per KV head: (kv_heads, q_per_kv query slots + key + value, head_dim)
        qkv = qkv.view(L, kv_heads, q_per_kv + 2, head_dim)
        q = qkv[:, :, :q_per_kv].reshape(L, heads, head_dim)  # query head g*q_per_kv + s
        k = qkv[:, :, q_per_kv]                                # (L, kv_heads, head_dim)
        v = qkv[:, :, q_per_kv + 1]
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q, k = _apply_rotary(q, base), _apply_rotary(k, base)
        # GQA: query head j uses key/value head j // q_per_kv
        k = k.repeat_interleave(q_per_kv, dim=0)
        v = v.repeat_interleave(q_per_kv, dim=0)
        out = _merge_heads(_attention(q, k, v, causal=True))
        x = x + _plora_linear(sd, f"{b}.attention.wo", out, image_mask, bias, lora)
        h = _rms_norm(sd, f"{b}.ffn_norm", x, eps)
        gate = F.silu(_plora_linear(sd, f"{b}.feed_forward.w1", h, image_mask, False, lora))
        up = _plora_linear(sd, f"{b}.feed_forward.w3", h, image_mask, False, lora)
        x = x + _plora_linear(sd, f"{b}.feed_forward.w2", gate * up, image_mask, False, lora)
    x = _rms_norm(sd, "model.norm", x, eps)
    return F.linear(x, _w(sd, "output.weight"))


# ----------------------------------------------------------------------------------------
# Public forward and greedy decoding
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def upstream_logits(config, sd, input_ids, images=None, image_positions=None, *, lora=True):
    """Upstream forward of ONE sequence -> logits (1, L', vocab), float32.

    input_ids: (1, L) text tokens only (BOS included by the caller if wanted).
    images: (n, 3, H, W) normalized pixels, or None.
    image_positions: n sorted text-token indices; image i goes right before text token
        image_positions[i] (L means after the last token).
    lora=False drops the (P)LoRA terms (only for self-checks).
    L' = L + n * upstream_num_image_tokens(config, sd).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, L), got {tuple(input_ids.shape)}")
    ids = input_ids[0]
    n_images = 0 if images is None else images.shape[0]
    positions = _check_positions(image_positions, n_images, ids.shape[0])
    version = upstream_version(config)

    embed_name = "internlm_model.model.embed_tokens.weight" if version == 1 else "model.tok_embeddings.weight"
    text = _w(sd, embed_name)[ids]                                       # (L, hidden)
    image_fn = _v1_image_embeddings if version == 1 else _v2_image_embeddings
    image_embeds = [image_fn(sd, images[i]) for i in range(n_images)]    # each (T, hidden)

    rows, is_image = _splice(list(text), [list(e) for e in image_embeds], positions)
    x = torch.stack(rows)                                                 # (L', hidden)
    image_mask = torch.tensor(is_image, dtype=torch.bool)

    if version == 1:
        logits = _v1_decoder(config, sd, x, lora)
    else:
        logits = _v2_decoder(config, sd, x, image_mask, lora)
    return logits[None]


@torch.no_grad()
def upstream_greedy(config, sd, input_ids, images, image_positions, max_new_tokens, eos_ids=None):
    """Greedy decoding, recomputing the full forward every step (no cache).

    Returns the list of new token ids; stops after emitting any id in eos_ids (an int or an
    iterable; the eos token is included in the result) or after max_new_tokens tokens.
    New tokens are text: they are appended after the spliced prompt and get no PLoRA.
    """
    if eos_ids is None:
        eos = set()
    elif isinstance(eos_ids, int):
        eos = {eos_ids}
    else:
        eos = set(int(e) for e in eos_ids)
    ids = input_ids.clone()
    new_tokens = []
    for _ in range(max_new_tokens):
        logits = upstream_logits(config, sd, ids, images, image_positions)
        token = int(logits[0, -1].argmax())
        new_tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype)], dim=1)
        if token in eos:
            break
    return new_tokens
