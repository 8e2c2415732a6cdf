"""An independent, plain re-statement of XComposer-2.5 / 4KHD's numerics, from the facts page
(/work/shared/reference/UPSTREAM_FORMATS_HD.md) only, like tests/upstream_reference.py for v1/v2.

It imports nothing of the repository's model, processor or converter code: PIL, numpy, torch and the public
pieces of tests/upstream_reference.py (the CLIP tower, the tiny state dicts, the .bin writer). Everything runs in
float32, one sequence at a time, with explicit loops; the decoder keeps a key/value cache the way upstream's
generation does, so dynamic NTK scaling rotates each chunk of rows with the base of the length it was added at.

Public API
    tiny_upstream_hd_config(**overrides) -> dict                 (a 2.5-style config.json at tiny size)
    make_upstream_hd_state_dict(config, seed=0, tile=56, video_mem=False) -> dict
    hd_geometry(width, height, hd_num, tile, clamp) -> (rows, cols)
    hd_num_tokens(rows, cols, tile, patch=14) -> int
    hd_preprocess(image, hd_num, tile, padding="bottom", clamp=True) -> (1, 3, H', W') tensor
    hd_views(tensor, tile) -> (1 + rows * cols, 3, tile, tile)
    hd_image_embeddings(sd, tensor, tile) -> (n, hidden)
    chat_prompt_2d5(query, num_images, history=(), meta=None) -> str
    hd_prompt_rows(config, sd, tokenize, prompt, tensors, tile) -> (rows (L, hidden), image mask (L,), ids)
    hd_logits(config, sd, rows, image_mask) -> (L, vocab)
    hd_greedy(config, sd, rows, image_mask, max_new_tokens, eos_ids) -> list[int]
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from upstream_reference import clip_patch_features, make_upstream_state_dict, tiny_upstream_config

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 14


# ----------------------------------------------------------------------------------------------- checkpoints

def tiny_upstream_hd_config(**overrides):
    """A 2.5-style config.json: the XComposer2 one with a dynamic rope factor of 2 and no img_size (the tile
    size lives in the position table). max_position_embeddings is tiny so that NTK scaling is reachable."""
    config = tiny_upstream_config(2, torch_dtype="float32", max_position_embeddings=96, max_length=16384,
                                  rope_scaling={"type": "dynamic", "factor": 2.0})
    config.pop("img_size")
    config.update(overrides)
    return config


def make_upstream_hd_state_dict(config, seed=0, tile=56, video_mem=False):
    """Random fp32 tensors in the upstream 2.5 layout: XComposer2's, with the projector taking 4 x the CLIP width,
    the two separators, and (OmniLive base) an unused video-memory projector."""
    sd = make_upstream_state_dict(dict(config, img_size=tile), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    width = sd["vit.vision_tower.vision_model.embeddings.patch_embedding.weight"].shape[0]
    hidden = config["hidden_size"]
    sd["vision_proj.0.weight"] = torch.randn(hidden, 4 * width, generator=gen) / math.sqrt(4 * width)
    sd["plora_glb_GN"] = torch.randn(1, 1, 4 * width, generator=gen)
    sd["plora_sub_GN"] = torch.randn(1, 1, 1, 4 * width, generator=gen)
    if video_mem:
        sd["video_mem_proj.0.weight"] = torch.randn(hidden, 24, generator=gen)
        sd["video_mem_proj.0.bias"] = torch.randn(hidden, generator=gen)
        sd["video_mem_proj.2.weight"] = torch.randn(hidden, hidden, generator=gen)
        sd["video_mem_proj.2.bias"] = torch.randn(hidden, generator=gen)
    return sd


# ----------------------------------------------------------------------------------------------- preprocessing

def _scale(width, height, hd_num, tile, clamp):
    """Facts §2.2, landscape frame: the largest s with s * ceil(s / ratio) <= hd_num, then 2.5's clamp."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if clamp:
        scale = min(math.ceil(width / tile), scale)
    return scale


def hd_geometry(width, height, hd_num, tile, clamp):
    """(rows, cols) of the tile grid in the image's own orientation (facts §3, last paragraph)."""
    portrait = width < height
    if portrait:
        width, height = height, width
    scale = _scale(width, height, hd_num, tile, clamp)
    new_w = int(scale * tile)
    new_h = int(new_w / (width / height))
    rows, cols = math.ceil(new_h / tile), scale
    return (cols, rows) if portrait else (rows, cols)


def hd_num_tokens(rows, cols, tile, patch=PATCH):
    g = tile // patch // 2
    return (rows * cols + 1) * g * g + 1 + (rows + 1) * g


def hd_preprocess(image, hd_num, tile, padding="bottom", clamp=True):
    """Facts §2 for one RGB PIL image -> (1, 3, H', W') normalized, H' and W' multiples of the tile."""
    portrait = image.width < image.height
    if portrait:
        image = image.transpose(Image.TRANSPOSE)
    width, height = image.size
    ratio = width / height
    scale = _scale(width, height, hd_num, tile, clamp)
    new_w = int(scale * tile)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.BILINEAR)  # torchvision resize of a PIL image
    target = math.ceil(new_h / tile) * tile
    top = 0 if padding == "bottom" else int((target - new_h) / 2)
    canvas = np.full((target, new_w, 3), 255, dtype=np.uint8)
    canvas[top:top + new_h] = np.asarray(image)
    tensor = torch.from_numpy(canvas).permute(2, 0, 1).float().div(255)  # ToTensor
    if portrait:
        tensor = tensor.transpose(1, 2).contiguous()
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((tensor - mean) / std)[None]


def hd_views(tensor, tile):
    """Facts §3.1-3.2: the global view (bicubic), then the tiles top row first, left to right."""
    _, _, height, width = tensor.shape
    views = [F.interpolate(tensor.float(), size=(tile, tile), mode="bicubic", align_corners=False)[0]]
    for r in range(height // tile):
        for c in range(width // tile):
            views.append(tensor[0, :, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
    return torch.stack(views)


# ----------------------------------------------------------------------------------------------- vision side

def _merge(features, grid):
    """(G*G, C) -> (g, g, 4C): patches (dy, dx) = (0,0), (0,1), (1,0), (1,1) side by side (facts §3.4)."""
    width = features.shape[1]
    square = features.view(grid, grid, width)
    g = grid // 2
    out = torch.empty(g, g, 4 * width)
    for y in range(g):
        for x in range(g):
            for dy in range(2):
                for dx in range(2):
                    k = 2 * dy + dx
                    out[y, x, k * width:(k + 1) * width] = square[2 * y + dy, 2 * x + dx]
    return out


def hd_image_embeddings(sd, tensor, tile, reverse_tiles=False):
    """One image's (1, 3, H', W') tensor -> (n, hidden): facts §3.3-3.8. `reverse_tiles` only for
    checking that tile order matters."""
    rows, cols = tensor.shape[2] // tile, tensor.shape[3] // tile
    views = hd_views(tensor, tile)
    if reverse_tiles:
        views = torch.cat([views[:1], views[1:].flip(0)])
    grid = tile // PATCH
    merged = [_merge(clip_patch_features(sd, view), grid) for view in views]
    g = grid // 2
    sub_gn, glb_gn = sd["plora_sub_GN"].float().reshape(-1), sd["plora_glb_GN"].float().reshape(-1)
    tokens = []
    for y in range(g):  # global part, a newline after each row
        tokens += [merged[0][y, x] for x in range(g)] + [sub_gn]
    tokens.append(glb_gn)
    for r in range(rows):  # stitched sub-image grid
        for y in range(g):
            for c in range(cols):
                tokens += [merged[1 + r * cols + c][y, x] for x in range(g)]
            tokens.append(sub_gn)
    x = torch.stack(tokens)
    x = F.gelu(F.linear(x, sd["vision_proj.0.weight"].float(), sd["vision_proj.0.bias"].float()))
    return F.linear(x, sd["vision_proj.2.weight"].float(), sd["vision_proj.2.bias"].float())


# ----------------------------------------------------------------------------------------------- prompt

def chat_prompt_2d5(query, num_images, history=(), meta=None):
    """Facts §4: optional system turn, history turns, the query; one image and no placeholder -> in front."""
    prompt = "" if meta is None else f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n"
    for q, a in history:
        prompt += f"[UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{a}[UNUSED_TOKEN_145]\n"
    prompt += f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    if num_images == 1 and "<ImageHere>" not in prompt:
        prompt = "<ImageHere>" + prompt
    return prompt


def hd_prompt_rows(config, sd, tokenize, prompt, tensors, tile, reverse_tiles=False):
    """Facts §4 placement: split at <ImageHere>; the first part always, with BOS; later parts without BOS,
    skipped when empty; image embeddings in order. tokenize(text, bos) -> ids.
    -> (rows (L, hidden), image mask (L,), the text ids in order)."""
    parts = prompt.split("<ImageHere>")
    if len(parts) - 1 != len(tensors):
        raise ValueError(f"{len(parts) - 1} placeholders, {len(tensors)} images")
    table = sd["model.tok_embeddings.weight"].float()
    rows, mask, ids = [], [], []
    for i, part in enumerate(parts):
        if i > 0:
            emb = hd_image_embeddings(sd, tensors[i - 1], tile, reverse_tiles)
            rows += list(emb)
            mask += [True] * emb.shape[0]
        if i == 0 or part:
            tokens = tokenize(part, i == 0)
            rows += [table[t] for t in tokens]
            mask += [False] * len(tokens)
            ids += tokens
    return torch.stack(rows), torch.tensor(mask), ids


# ----------------------------------------------------------------------------------------------- decoder

def _rms(sd, name, x, eps):
    return sd[name].float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _plora(sd, name, x, mask):
    y = F.linear(x, sd[f"{name}.weight"].float())
    low = F.linear(F.linear(x, sd[f"{name}.Plora_A.weight"].float()), sd[f"{name}.Plora_B.weight"].float())
    return y + low * mask[:, None].float()


def _base(config, seq_len, head_dim):
    """Facts §4 RoPE: the base once the sequence is longer than max_position_embeddings."""
    base = float(config["rope_theta"])
    scaling = config.get("rope_scaling") or {}
    limit = config["max_position_embeddings"]
    if scaling.get("type") == "dynamic" and seq_len > limit:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / limit) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return base


def _rotate(x, positions, base):
    """x (H, L, d), rotate-half, positions as given."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    half = d // 2
    return x * emb.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * emb.sin()


def _chunk(config, sd, x, mask, cache):
    """Rows x (L, hidden) appended after the cache {layer: (k, v)} -> logits (L, vocab); the cache grows."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    per, d = heads // kv_heads, config["hidden_size"] // heads
    eps, L = config["rms_norm_eps"], x.shape[0]
    past = cache[0][0].shape[1] if 0 in cache else 0
    positions = torch.arange(past, past + L)
    base = _base(config, past + L, d)
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}"
        h = _rms(sd, f"{b}.attention_norm.weight", x, eps)
        qkv = _plora(sd, f"{b}.attention.wqkv", h, mask).view(L, kv_heads, per + 2, d)
        q = qkv[:, :, :per].reshape(L, heads, d).transpose(0, 1)
        k, v = qkv[:, :, per].transpose(0, 1), qkv[:, :, per + 1].transpose(0, 1)
        q, k = _rotate(q, positions, base), _rotate(k, positions, base)
        if i in cache:
            k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
        cache[i] = (k, v)
        k, v = k.repeat_interleave(per, 0), v.repeat_interleave(per, 0)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d)
        allowed = torch.arange(past + L)[None, :] <= positions[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        out = (probs @ v).transpose(0, 1).reshape(L, -1)
        x = x + _plora(sd, f"{b}.attention.wo", out, mask)
        h = _rms(sd, f"{b}.ffn_norm.weight", x, eps)
        gate = F.silu(_plora(sd, f"{b}.feed_forward.w1", h, mask))
        x = x + _plora(sd, f"{b}.feed_forward.w2", gate * _plora(sd, f"{b}.feed_forward.w3", h, mask), mask)
    x = _rms(sd, "model.norm.weight", x, eps)
    return F.linear(x, sd["output.weight"].float())


@torch.no_grad()
def hd_logits(config, sd, rows, image_mask):
    """The prompt in one forward -> (L, vocab)."""
    return _chunk(config, sd, rows.float(), image_mask, {})


@torch.no_grad()
def hd_greedy(config, sd, rows, image_mask, max_new_tokens, eos_ids=()):
    """Greedy decoding as upstream's cached generation: the prompt, then one new (text) row per step."""
    cache, tokens = {}, []
    logits = _chunk(config, sd, rows.float(), image_mask, cache)
    table = sd["model.tok_embeddings.weight"].float()
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        tokens.append(token)
        if token in set(eos_ids):
            break
        logits = _chunk(config, sd, table[token][None], torch.zeros(1, dtype=torch.bool), cache)
    return tokens
