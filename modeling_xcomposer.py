"""InternLM-XComposer (v1) and InternLM-XComposer2 (v2), for every transformers release from 4.45 to 5.24.

Laid out in the papers' figure order: vision tower (CLIP ViT-L / EVA-CLIP ViT-g), connectors
(the v2 MLP projector from build_mlp.py, XComposer-2.5 / 4KHD's tile layout in front of it, the v1
PerceiveSampler), the InternLM(2) decoder with Partial LoRA, then the pretrained base class and the
causal-LM wrapper. What differs between transformers
releases lives in transformers_compat.py.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, ProcessorMixin
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)

try:  # as remote code, inside transformers' dynamic package
    from .build_mlp import build_vision_projector
    from .configuration_xcomposer import XComposerConfig, XComposerQFormerConfig, XComposerTextConfig, XComposerVisionConfig
    from .processing_xcomposer import IMAGE_PLACEHOLDER, XComposerProcessor
    from .transformers_compat import CACHE_FIELD, GradientCheckpointingLayer, cache_argument, cache_update, init
    from .transformers_compat import registered_attention, return_dict_default, static_cache_length
except ImportError:  # from a checkout, where scripts and tests import the flat modules directly
    try:  # a try of its own: transformers 4.x's scan for missing packages skips only try blocks
        from build_mlp import build_vision_projector
        from configuration_xcomposer import XComposerConfig, XComposerQFormerConfig, XComposerTextConfig, XComposerVisionConfig
        from processing_xcomposer import IMAGE_PLACEHOLDER, XComposerProcessor
        from transformers_compat import CACHE_FIELD, GradientCheckpointingLayer, cache_argument, cache_update, init
        from transformers_compat import registered_attention, return_dict_default, static_cache_length
    except ImportError:
        raise


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: (B, H, Q, d) x (B, KV, K, d) -> (B, Q, H, d), softmax in fp32 as upstream."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask if attention_mask.dtype != torch.bool else weights.masked_fill(
            ~attention_mask, torch.finfo(weights.dtype).min
        )
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """torch's fused attention; without a mask it is causal exactly when the module is (decoder, not ViT)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    is_causal = attention_mask is None and module.is_causal and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal)
    return out.transpose(1, 2).contiguous(), None


def attention_interface(config) -> Callable:
    """The kernel `config._attn_implementation` names: ours for eager and SDPA (the same on every release),
    transformers' registry for the rest (FlashAttention, flex attention, kernels users register)."""
    # transformers 4.57+ lets model.set_attn_implementation switch a remote model only if this file mentions
    # eager_attention_forward and ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation] (5.x:
    # ALL_ATTENTION_FUNCTIONS.get_interface(): the registry lookup is in transformers_compat.registered_attention.
    name = config._attn_implementation
    if name in (None, "eager"):
        return eager_attention_forward
    if name == "sdpa":
        return sdpa_attention_forward
    return registered_attention(name)


def causal_lm_loss(logits, labels, image_token_id: int, input_ids=None, ignore_index: int = -100,
                   num_items_in_batch=None, shift_labels=None) -> torch.Tensor:
    """Next-token cross-entropy in fp32. Image positions are never targets: neither labels holding the image id
    (e.g. labels=input_ids) nor the positions input_ids marks as image. With `num_items_in_batch` (the Trainer's
    count over gradient-accumulation steps) the sum is divided by it instead of averaging. `shift_labels`, the
    targets already aligned with the logits (sequence/context-parallel training shifts the full sequence before
    sharding it), replace `labels` and are not shifted again."""
    if shift_labels is not None:
        logits, labels = logits.float(), shift_labels.masked_fill(shift_labels == image_token_id, ignore_index)
    else:
        labels = labels.masked_fill(labels == image_token_id, ignore_index)
        if input_ids is not None and input_ids.shape == labels.shape:
            labels = labels.masked_fill(input_ids == image_token_id, ignore_index)
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
    labels = labels.to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


# --------------------------------------------------------------------------- vision tower


class BidirectionalAttention(nn.Module):
    """What the ViT's and the Q-Former's attentions share: hidden_size / num_attention_heads per head, no
    causal mask, and the kernel their sub-config names."""

    is_causal = False  # read by transformers' kernels too: SDPA would otherwise go causal without a mask

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5

    def attend(self, q, k, v, output_attentions: bool = False):
        """(N, H, T, d) queries, keys and values -> (N, T, H * d), and the weights when asked (eager computes them)."""
        kernel = eager_attention_forward if output_attentions else attention_interface(self.config)
        out, weights = kernel(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return out.reshape(out.shape[0], out.shape[1], -1), weights


class VisionAttention(BidirectionalAttention):
    """ViT attention with a fused qkv. EVA (BLIP-2 build) learns only q and v biases: its effective qkv bias
    is [q_bias, 0, v_bias]."""

    def __init__(self, config: XComposerVisionConfig):
        super().__init__(config)
        self.eva = config.variant == "eva"
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=not self.eva)
        if self.eva:
            self.q_bias = nn.Parameter(torch.zeros(config.hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        batch, length, _ = x.shape
        qkv = self.qkv(x)  # through the module, so adapters (PEFT) and offload hooks on it take effect
        if self.eva:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)
        out, weights = self.attend(q, k, v, output_attentions)
        return self.proj(out), weights


class VisionMLP(nn.Module):
    def __init__(self, config: XComposerVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: XComposerVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        attended, weights = self.attn(self.norm1(x), output_attentions)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class VisionEmbeddings(nn.Module):
    """Patch embedding, CLS token and learned position table: (N, 3, S, S) -> (N, 1 + num_patches, width).
    One leaf module, so device maps and offloading place these parameters with the code that reads them."""

    def __init__(self, config: XComposerVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.patch_embed = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size,
                                     bias=config.variant == "eva")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, D)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class VisionTransformer(nn.Module):
    """CLIP ViT-L/14 (v2) or EVA-CLIP ViT-g (v1): one pre-LN ViT, the variant sets the details.
    Returns the last block's tokens, CLS first, (N, 1 + num_patches, width), and on request each block's input
    plus the last block's output (hidden_states) and each block's attention weights."""

    def __init__(self, config: XComposerVisionConfig):
        super().__init__()
        self.config = config
        width, clip = config.hidden_size, config.variant == "clip"
        self.embeddings = VisionEmbeddings(config)
        self.pre_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if clip else None  # CLIP's pre_layrnorm
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        # EVA is followed by BLIP-2's ln_vision; CLIP's post_layernorm is unused by XComposer2.
        self.post_norm = None if clip else nn.LayerNorm(width, eps=config.final_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BaseModelOutput:
        x = self.embeddings(pixel_values)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        all_hidden, all_attentions = (), ()
        for block in self.blocks:
            all_hidden += (x,) if output_hidden_states else ()
            x, weights = block(x, output_attentions=output_attentions)
            all_attentions += (weights,) if output_attentions else ()
        all_hidden += (x,) if output_hidden_states else ()
        return BaseModelOutput(last_hidden_state=x if self.post_norm is None else self.post_norm(x),
                               hidden_states=all_hidden or None, attentions=all_attentions or None)

    @torch.no_grad()
    def resize_position_embeddings(self, image_size: int) -> None:
        """Bicubic (align_corners=False) resize of the patch position grid to a new image size, CLS row kept,
        as XComposer2 does to run CLIP-336 at 490 px (and at 224 px for composition fine-tuning)."""
        if image_size % self.config.patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({self.config.patch_size})")
        embeddings = self.embeddings
        embeddings.pos_embed = nn.Parameter(interpolate_pos_embed(embeddings.pos_embed.data,
                                                                  image_size // self.config.patch_size))
        self.config.image_size = image_size


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D), interpolating the patch part in fp32."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(patch_pos.shape[1] ** 0.5)
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position table of {patch_pos.shape[1]} patches is not a square grid")
    if old == grid:
        return pos_embed.clone()
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# --------------------------------------------------------------------------- XComposer-2.5 / 4KHD: tile layout


class TileLayout(nn.Module):
    """How XComposer-2.5 and 4KHD lay out one image's patch tokens before the projector. Per image the views are
    [global, tile_1 .. tile_(rows*cols)] (tiles row-major); each view's hd_merge x hd_merge patch blocks merge into
    one token; the global view's rows and then the stitched (rows*g) x (cols*g) tile grid's rows are each followed
    by the learned row separator `sub_GN`, with the learned `glb_GN` between the two parts. The separators are
    upstream's plora_sub_GN / plora_glb_GN with their shapes, and live here, on the module that reads them."""

    def __init__(self, config: XComposerConfig):
        super().__init__()
        self.merge_size = config.hd_merge
        width = config.vision_config.hidden_size * self.merge_size**2
        self.merged = config.vision_config.image_size // config.vision_config.patch_size // self.merge_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    def merge(self, patches: torch.Tensor) -> torch.Tensor:
        """(V, G*G, C) row-major patch tokens -> (V, g, g, 4C); channel (2*dy + dx)*C + c holds patch (dy, dx)."""
        views, _, width = patches.shape
        g, m = self.merged, self.merge_size
        blocks = patches.reshape(views, g, m, g, m, width).permute(0, 1, 3, 2, 4, 5)  # (V, gy, gx, dy, dx, C)
        return blocks.reshape(views, g, g, m * m * width)

    def with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        """(R, K, W) -> (R * (K + 1), W): the row separator after every row."""
        ends = self.sub_GN[0].expand(grid.shape[0], 1, -1).to(grid.dtype)
        return torch.cat([grid, ends], dim=1).flatten(0, 1)

    def forward(self, patches: torch.Tensor, grids: list) -> torch.Tensor:
        """(V, G*G, C) patch tokens of all views of all images, their (rows, cols) tile grids -> (positions, 4C)."""
        merged, out, start = self.merge(patches), [], 0
        g = self.merged
        for rows, cols in grids:
            views = merged[start:start + 1 + rows * cols]
            start += 1 + rows * cols
            tiles = views[1:].reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
            out += [self.with_row_ends(views[0]), self.glb_GN[0].to(merged.dtype), self.with_row_ends(tiles)]
        return torch.cat(out)


def tile_grids(image_grid, num_views: int | None = None) -> list:
    """(rows, cols) per image from `image_grid` ((num_images, 2) integers, as the processor returns it), checked
    against the number of views in pixel_values (1 global + rows * cols tiles each)."""
    if not isinstance(image_grid, torch.Tensor):
        image_grid = torch.as_tensor(image_grid)
    if image_grid.ndim != 2 or image_grid.shape[1] != 2 or image_grid.is_floating_point() or image_grid.is_complex():
        raise ValueError(f"image_grid must be integers of shape (num_images, 2), got {image_grid.dtype} "
                         f"{tuple(image_grid.shape)}")
    grids = [tuple(pair) for pair in image_grid.tolist()]
    if any(rows < 1 or cols < 1 for rows, cols in grids):
        raise ValueError(f"image_grid rows and columns must be positive, got {grids}")
    expected = sum(1 + rows * cols for rows, cols in grids)
    if num_views is not None and num_views != expected:
        raise ValueError(f"pixel_values hold {num_views} views but image_grid {grids} needs {expected} "
                         f"(a global view plus rows * cols tiles per image)")
    return grids


# --------------------------------------------------------------------------- v1 connector: perceive sampler


class QFormerAttention(BidirectionalAttention):
    """BERT attention with a post-LN residual; keys and values come from `context` for cross-attention."""

    def __init__(self, config: XComposerQFormerConfig, context_width: int):
        super().__init__(config)
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)
        self.value = nn.Linear(context_width, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def heads(t):  # (N, T, D) -> (N, H, T, d)
            return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        out, _ = self.attend(q, k, v)
        return self.norm(x + self.dense(out))


class QFormerLayer(GradientCheckpointingLayer):
    """Self-attention over the queries, cross-attention to the image (every n-th layer), query feed-forward."""

    def __init__(self, config: XComposerQFormerConfig, layer_idx: int):
        super().__init__()
        self.self_attn = QFormerAttention(config, config.hidden_size)
        cross = layer_idx % config.cross_attention_frequency == 0
        self.cross_attn = QFormerAttention(config, config.encoder_hidden_size) if cross else None
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.self_attn(queries, queries)
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, image_embeds)
        return self.ffn_norm(queries + self.fc2(self.act(self.fc1(queries))))


class PerceiveSampler(nn.Module):
    """XComposer v1's connector: learned queries read the image through a Q-Former, are projected to the
    decoder width, and are wrapped in learned start/end flags -> (N, num_queries + 2, text width)."""

    def __init__(self, config: XComposerConfig):
        super().__init__()
        qformer, text_width = config.qformer_config, config.text_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, qformer.num_query_tokens, qformer.hidden_size))
        self.layernorm = nn.LayerNorm(qformer.hidden_size, eps=qformer.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(qformer, i) for i in range(qformer.num_hidden_layers))
        self.internlm_proj = nn.Linear(qformer.hidden_size, text_width)
        # Upstream keeps the flags frozen at their pre-trained values.
        self.flag_image_start = nn.Parameter(torch.zeros(1, 1, text_width), requires_grad=False)
        self.flag_image_end = nn.Parameter(torch.zeros(1, 1, text_width), requires_grad=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        num_images = image_embeds.shape[0]
        queries = self.layernorm(self.query_tokens.expand(num_images, -1, -1))
        for layer in self.layers:
            queries = layer(queries, image_embeds)
        queries = self.internlm_proj(queries)
        start, end = self.flag_image_start.expand(num_images, -1, -1), self.flag_image_end.expand(num_images, -1, -1)
        return torch.cat([start.to(queries.dtype), queries, end.to(queries.dtype)], dim=1)


# --------------------------------------------------------------------------- decoder


class LoRAFactor(nn.Module):
    """One factor (A or B) of a low-rank update: a bias-free linear map that is deliberately not an nn.Linear,
    so PEFT's `target_modules="all-linear"` adapts the PartialLoRALinear around it, never the factor itself."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.zero_init = zero_init  # B starts at zero, so a fresh adapter adds nothing
        nn.init.zeros_(self.weight) if zero_init else nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PartialLoRALinear(nn.Linear):
    """A linear layer with a low-rank term `scaling * B(A(x))`.

    Partial LoRA (XComposer2) adds it to image-token rows only, given as flat row indices computed once per
    forward; with `image_rows=None` (text-only inputs, decode steps) it costs nothing. With `all_rows` it is
    plain LoRA on every row (XComposer v1's unmerged adapters). Rank 0 is a plain linear layer.
    """

    def __init__(self, in_features, out_features, bias, rank=0, alpha=1.0, dropout=0.0, all_rows=False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.all_rows = rank, all_rows
        if rank:
            self.A = LoRAFactor(in_features, rank)
            self.B = LoRAFactor(rank, out_features, zero_init=True)
            self.scaling = alpha / rank
            self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        if not self.rank:
            return y
        if self.all_rows:
            return y + self.B(self.A(self.lora_dropout(x))) * self.scaling
        if image_rows is None:
            return y
        rows = x.reshape(-1, x.shape[-1]).index_select(0, image_rows)
        delta = self.B(self.A(self.lora_dropout(rows))) * self.scaling
        return y.reshape(-1, y.shape[-1]).index_add(0, image_rows, delta.to(y.dtype)).view_as(y)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold plain LoRA into the weight in fp32 (W += scaling * B @ A) and drop the adapter. Partial LoRA
        cannot be merged: it must stay off the text rows."""
        if not self.all_rows:
            raise ValueError("Partial LoRA acts on image rows only and cannot be merged into the weight")
        delta = self.scaling * self.B.weight.float() @ self.A.weight.float()
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        del self.A, self.B, self.lora_dropout
        self.rank = 0

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", rank={self.rank}, all_rows={self.all_rows}" if self.rank else "")


def decoder_linear(config: XComposerTextConfig, name: str, in_features: int, out_features: int, bias=False):
    rank = config.lora_rank if name in config.lora_targets else 0
    return PartialLoRALinear(in_features, out_features, bias, rank, config.lora_alpha, config.lora_dropout,
                             all_rows=config.lora_scope == "all")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # in fp32, as upstream
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


def rotary_embedding(config: XComposerTextConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin (B, L, head_dim) of rotate-half RoPE, computed in fp32 then cast, as upstream."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    if getattr(config, "rope_dynamic_factor", None) is not None:
        inv_freq = dynamic_inv_freq(config, position_ids, inv_freq)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def dynamic_inv_freq(config: XComposerTextConfig, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """InternLM2's dynamic NTK scaling, per sequence: while a sequence holds L <= max_position_embeddings tokens
    the base stays rope_theta; beyond, the rows computed now use base rope_theta * (f * L / max - (f - 1)) **
    (d / (d - 2)) (f = rope_dynamic_factor), and keys already in the cache keep the rotation they got. L is the
    sequence's length so far (its last position + 1; left padding is not counted). -> (B, 1, head_dim / 2)."""
    dim, limit, factor = config.head_dim, config.max_position_embeddings, config.rope_dynamic_factor
    length = position_ids.amax(-1).double() + 1  # (B,), in float64 like upstream's Python floats
    scaled = config.rope_theta * ((factor * length.clamp(min=limit) / limit) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, device=position_ids.device).float() / dim
    return torch.where((length > limit)[:, None, None], 1.0 / (scaled.float()[:, None, None] ** exponents), inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def causal_mask(attention_mask, query_length: int, past_length: int, key_length: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, Q, K) mask, True where a query may attend: keys at or before its position, and not
    padding (`attention_mask`, (B, <= K), 1 for real tokens, or None). A padded position still attends to
    itself, so no row is empty (SDPA returns NaN for an empty row, which would then reach real tokens)."""
    query_pos = torch.arange(past_length, past_length + query_length, device=device)[:, None]  # (Q, 1)
    key_pos = torch.arange(key_length, device=device)[None, :]  # (1, K)
    allowed = (key_pos <= query_pos)[None]  # (1, Q, K)
    if attention_mask is not None:
        real = attention_mask.bool()
        real = F.pad(real, (0, key_length - real.shape[-1])) if real.shape[-1] < key_length else real[:, -key_length:]
        allowed = (allowed & real[:, None, :]) | (key_pos == query_pos)[None]
    return allowed[:, None]


class Attention(nn.Module):
    """InternLM(2) attention: fused wqkv laid out [Q; K; V] (the converter reorders InternLM2's per-group
    packing and fuses InternLM's q/k/v), rotary, the cache update, then the configured attention kernel."""

    def __init__(self, config: XComposerTextConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        qkv_width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = decoder_linear(config, "wqkv", config.hidden_size, qkv_width, bias=config.attention_bias)
        self.wo = decoder_linear(config, "wo", self.num_heads * self.head_dim, config.hidden_size,
                                 bias=config.attention_bias)

    def forward(self, x, position_embeddings, attention_mask=None, cache=None, image_rows=None,
                output_attentions=False, cache_position=None, **kwargs):
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x, image_rows).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, KV, L, d)
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache_update(cache, k, v, self.layer_idx, cache_position)
        dropout = self.config.attention_dropout if self.training else 0.0
        attend = eager_attention_forward if output_attentions else attention_interface(self.config)
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs)
        return self.wo(out.reshape(batch, length, -1), image_rows), weights


class FeedForward(nn.Module):
    def __init__(self, config: XComposerTextConfig):
        super().__init__()
        self.w1 = decoder_linear(config, "w1", config.hidden_size, config.intermediate_size)
        self.w3 = decoder_linear(config, "w3", config.hidden_size, config.intermediate_size)
        self.w2 = decoder_linear(config, "w2", config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(self.act(self.w1(x, image_rows)) * self.w3(x, image_rows), image_rows)


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: XComposerTextConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, position_embeddings, attention_mask=None, cache=None, image_rows=None, **kwargs):
        attended, weights = self.attention(self.attention_norm(x), position_embeddings, attention_mask, cache,
                                           image_rows, **kwargs)
        x = x + attended
        return x + self.feed_forward(self.ffn_norm(x), image_rows), weights


class TokenEmbedding(nn.Embedding):
    """The decoder's token table. Image ids are looked up as row 0, since image features replace those rows,
    so `get_input_embeddings()(input_ids)` works on prompts with images whether the image id lies past the
    table (the default) or inside a resized one."""

    def __init__(self, num_embeddings: int, embedding_dim: int, image_token_id: int):
        super().__init__(num_embeddings, embedding_dim)
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids.masked_fill(input_ids == self.image_token_id, 0))


class InternLMDecoder(nn.Module):
    """InternLM2 (v2) or InternLM (v1) without its LM head; names as InternLM2's. Builds the mask and the rotary
    tables once per forward for all layers."""

    def __init__(self, config: XComposerTextConfig, image_token_id: int):
        super().__init__()
        self.config = config
        self.tok_embeddings = TokenEmbedding(config.vocab_size, config.hidden_size, image_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_length, cache, image_rows,
                output_attentions=False, output_hidden_states=False, **kwargs):
        mask = self._mask(attention_mask, inputs_embeds, past_length, cache, output_attentions)
        position_embeddings = rotary_embedding(self.config, position_ids, inputs_embeds.dtype)
        x, all_hidden, all_attentions = inputs_embeds, (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (x,)
            x, weights = layer(x, position_embeddings=position_embeddings, attention_mask=mask, cache=cache,
                               image_rows=image_rows, output_attentions=output_attentions, **kwargs)
            if output_attentions:
                all_attentions += (weights,)
        x = self.norm(x)
        return x, (all_hidden + (x,) if output_hidden_states else None), (all_attentions or None)

    def _mask(self, attention_mask, inputs_embeds, past_length, cache, eager: bool):
        """What the attention kernel takes: a prebuilt 4-D mask as given (compiled static-cache decoding); the
        2-D padding mask for kernels of transformers' registry (FlashAttention); else our boolean causal mask,
        or None where SDPA's own causal flag is exact (no padding, no past, no fixed-length cache)."""
        if attention_mask is not None and attention_mask.ndim == 4:
            return attention_mask
        implementation = "eager" if eager else self.config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            return attention_mask
        capacity = static_cache_length(cache) if cache is not None else None
        length = inputs_embeds.shape[1]
        if attention_mask is None and implementation == "sdpa" and past_length == 0 and capacity is None:
            return None
        return causal_mask(attention_mask, length, past_length, capacity or past_length + length,
                           inputs_embeds.device)


# --------------------------------------------------------------------------- models


@dataclass
class XComposerModelOutput(BaseModelOutputWithPast):
    """`image_outputs`: get_image_features' output for the prompt's images; `image_hidden_states`: its
    pooler_output, the features spliced into the decoder."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class XComposerCausalLMOutput(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


def _is_weight_file(name: str) -> bool:
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json"))


class XComposerPreTrainedModel(PreTrainedModel):
    config_class = XComposerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # PerceiveSampler whole: its learned queries and flags are parameters of the module that reads them.
    _no_split_modules = ["DecoderLayer", "VisionBlock", "PerceiveSampler"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # the 4.x name of the flag
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_cache_class = True  # 4.x: generate hands us a Cache object
    _supports_static_cache = True  # 4.x's name for what 5.x reads from _can_compile_fullgraph
    # Decode steps compile without graph breaks; the prefill checks image counts on the host, once.
    _can_compile_fullgraph = True

    def __init__(self, config: XComposerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # The towers are plain modules reading their own sub-config: hand down the checked implementation
        # unless the user chose one per sub-config.
        for sub in (config.vision_config, config.qformer_config, config.text_config):
            if sub is not None and getattr(sub, "_attn_implementation_internal", None) is None:
                sub._attn_implementation = config._attn_implementation

    if hasattr(PreTrainedModel, "set_attn_implementation"):  # 4.57+
        def set_attn_implementation(self, attn_implementation, *args, **kwargs):
            """transformers' switch reaches the sub-configs listed in config.sub_configs; the Q-Former's (not listed,
            since v2 has none) follows the top-level choice unless a dict names it."""
            super().set_attn_implementation(attn_implementation, *args, **kwargs)
            choice, qformer = self.config._attn_implementation, self.config.qformer_config
            if isinstance(attn_implementation, dict):
                choice = attn_implementation.get("qformer_config", choice)
            if qformer is not None:
                qformer._attn_implementation = choice

    def save_pretrained(self, save_directory, *args, max_shard_size="5GB", is_main_process=True, **kwargs):
        """transformers' save_pretrained (which copies this module and those it imports) with Hub-sized shards,
        staged: the files are written to a temporary folder beside `save_directory` and moved in only when all of
        them are written, weights first and config.json last, so a failed save never leaves a folder that
        looks loadable. Weight files of an earlier save that this one did not write are removed, as
        transformers does."""
        if not is_main_process:
            return super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size,
                                           is_main_process=False, **kwargs)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
        save_directory = os.path.abspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=save_directory)
        try:
            result = super().save_pretrained(staging, *args, max_shard_size=max_shard_size, **kwargs)
            names, umask = os.listdir(staging), os.umask(0)
            os.umask(umask)
            for name in sorted(names, key=lambda name: name == "config.json"):
                if name == "config.json":
                    for stale in set(filter(_is_weight_file, os.listdir(save_directory))) - set(names):
                        os.remove(os.path.join(save_directory, stale))
                os.chmod(os.path.join(staging, name), 0o666 & ~umask)  # safetensors writes 0600; files follow the umask
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    def _init_weights(self, module):
        """Every parameter this model has, so a fresh model is the same on every transformers release."""
        std = self.config.get_text_config().initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LoRAFactor):
            init.zeros_(module.weight) if module.zero_init else init.normal_(module.weight, std=std)
        elif isinstance(module, VisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.pos_embed, std=std)
        elif isinstance(module, VisionAttention) and module.eva:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, PerceiveSampler):
            for param in (module.query_tokens, module.flag_image_start, module.flag_image_end):
                init.normal_(param, std=std)
        elif isinstance(module, TileLayout):
            init.normal_(module.glb_GN, std=std)
            init.normal_(module.sub_GN, std=std)


class XComposerModel(XComposerPreTrainedModel):
    """Vision tower + connector + decoder; returns the decoder's last hidden states."""

    def __init__(self, config: XComposerConfig):
        super().__init__(config)
        self.vision_tower = VisionTransformer(config.vision_config)
        if config.connector == "perceive_sampler":
            self.perceive_sampler = PerceiveSampler(config)
        else:
            self.vision_proj = build_vision_projector(config)
        if config.dynamic_tiles:
            self.tile_layout = TileLayout(config)
        self.language_model = InternLMDecoder(config.text_config, config.image_token_id)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.tok_embeddings

    def set_input_embeddings(self, value):
        self.language_model.tok_embeddings = value  # any table: forward looks image ids up as row 0 itself

    def get_image_features(self, pixel_values: torch.Tensor, image_grid: torch.LongTensor | None = None,
                           output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                           return_dict: bool | None = None):
        """(N, 3, S, S) normalized pixels -> BaseModelOutputWithPooling, as transformers 5.x's VLMs return it:
        `pooler_output` the features the decoder takes, (N, num_image_tokens, text width); `last_hidden_state`
        the vision tower's tokens, (N, 1 + num_patches, vision width), CLS first; the tower's hidden_states and
        attentions on request. High-resolution models take every image's views ([global, tiles...], S = the
        tile size) with the images' (rows, cols) tile grids; their pooler_output is (image positions of all
        images, text width), in order."""
        config, size = self.config, self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            what = "views" if self.config.dynamic_tiles else "images"
            raise ValueError(f"pixel_values must have shape (num_{what}, 3, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        if config.dynamic_tiles and image_grid is None:
            raise ValueError("a high-resolution model needs image_grid (the processor returns it) with pixel_values")
        if not config.dynamic_tiles and image_grid is not None:
            raise ValueError("image_grid is only for high-resolution (hd_num) models")
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        vision = self.vision_tower(pixel_values, output_hidden_states=bool(output_hidden_states),
                                   output_attentions=bool(output_attentions))
        image_embeds = vision.last_hidden_state
        if config.dynamic_tiles:  # (views, G*G, C), CLS dropped -> merged, separated, projected
            grids = tile_grids(image_grid, pixel_values.shape[0])
            features = self.vision_proj(self.tile_layout(image_embeds[:, 1:], grids))
        elif config.connector == "perceive_sampler":
            features = self.perceive_sampler(image_embeds)
        else:
            features = self.vision_proj(image_embeds[:, 1:])  # v2 drops CLS and uses every patch
        output = BaseModelOutputWithPooling(last_hidden_state=image_embeds, pooler_output=features,
                                            hidden_states=vision.hidden_states, attentions=vision.attentions)
        return output if (return_dict_default(config) if return_dict is None else return_dict) else output.to_tuple()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        image_grid: torch.LongTensor | None = None,
        **kwargs,
    ) -> XComposerModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        config, text_config = self.config, self.config.text_config
        cache = cache_argument(cache, past_key_values, f"{type(self).__name__}.forward")
        if use_cache is None:
            use_cache = text_config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        compiling = torch.compiler.is_compiling()
        past_length = 0
        if cache is not None and not (compiling and attention_mask is not None and attention_mask.ndim == 4):
            past_length = cache.get_seq_length()
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if not compiling:
            self._check_lengths(length, past_length)

        image_rows = image_features = image_outputs = None
        if inputs_embeds is None:
            image_mask = input_ids == config.image_token_id
            if pixel_values is not None or (not compiling and past_length == 0):
                self._check_prefill(input_ids, image_mask, pixel_values, image_grid)
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # rows replaced below
            if pixel_values is not None:
                image_outputs = self.get_image_features(pixel_values, image_grid, output_hidden_states=output_hidden_states,
                                                        output_attentions=output_attentions, return_dict=True)
                image_features = image_outputs.pooler_output.to(inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], image_features.flatten(0, 1))
                image_rows = image_mask.flatten().nonzero().squeeze(1)  # flat row indices, for Partial LoRA
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds; splice image features yourself")

        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        if cache_position is None:  # where a static cache (before transformers 5.5) writes these keys
            cache_position = torch.arange(past_length, past_length + length, device=inputs_embeds.device)
        if text_config.lora_scope == "all" or not text_config.lora_rank:
            image_rows = None  # plain LoRA (or none) does not look at image rows

        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        hidden, all_hidden, all_attentions = self.language_model(
            inputs_embeds, attention_mask, position_ids, past_length, cache, image_rows,
            output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
            cache_position=cache_position, **kwargs)
        output = XComposerModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, attentions=all_attentions,
                                      image_hidden_states=image_features, image_outputs=image_outputs,
                                      **{CACHE_FIELD: cache if use_cache else None})
        return output if (return_dict_default(config) if return_dict is None else return_dict) else output.to_tuple()

    def _check_lengths(self, length: int, past_length: int) -> None:
        text_config = self.config.text_config
        limit = text_config.max_sequence_length
        if length == 0:
            raise ValueError("input_ids is empty: a prompt needs at least one token")
        if past_length + length > limit:
            source = ("text_config.max_position_embeddings" if limit == text_config.max_position_embeddings else
                      "text_config.max_position_embeddings x rope_dynamic_factor")
            raise ValueError(f"sequence of {past_length + length} tokens exceeds the maximum length of {limit} "
                             f"({source})")

    def _check_prefill(self, input_ids, image_mask, pixel_values, image_grid=None) -> None:
        """Once per prompt, in one host sync: token ids inside the vocabulary, finite pixels, and as many image
        positions as the images give (llava style: the processor expanded one <ImageHere> per image)."""
        config, vocab = self.config, self.config.text_config.vocab_size
        text_ids = input_ids.masked_fill(image_mask, 0)
        checks = [image_mask.sum(), text_ids.min(), text_ids.max()]
        if pixel_values is not None:
            checks.append(torch.isfinite(pixel_values).all())
        num_slots, low, high, *finite = torch.stack([c.to(torch.long) for c in checks]).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids hold ids from {low} to {high}, outside the vocabulary 0..{vocab - 1} "
                             f"(and the image id {config.image_token_id})")
        if finite and not finite[0]:
            raise ValueError("pixel_values hold NaN or infinite values")
        if pixel_values is None:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
            return
        if config.dynamic_tiles:
            if image_grid is None:
                raise ValueError("a high-resolution model needs image_grid (the processor returns it) with "
                                 "pixel_values")
            grids = tile_grids(image_grid, pixel_values.shape[0])
            expected = sum(config.hd_num_image_tokens(rows, cols) for rows, cols in grids)
            if num_slots != expected:
                raise ValueError(f"input_ids hold {num_slots} image tokens but the tile grids {grids} of "
                                 f"{len(grids)} images give {expected}; use one <ImageHere> per image")
            return
        num_images, per_image = pixel_values.shape[0], config.num_image_tokens
        if num_slots != num_images * per_image:
            raise ValueError(f"input_ids hold {num_slots} image tokens but {num_images} images give "
                             f"{num_images * per_image} ({per_image} per image); use one <ImageHere> per image")


class XComposerForCausalLM(XComposerPreTrainedModel, GenerationMixin):
    """XComposerModel plus the LM head (`output`, as InternLM2 names it)."""

    def __init__(self, config: XComposerConfig):
        super().__init__(config)
        self.model = XComposerModel(config)
        self.output = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def get_image_features(self, pixel_values: torch.Tensor, image_grid: torch.LongTensor | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid, **kwargs)

    def merge_lora(self) -> None:
        """Merge plain (all-row) LoRA adapters into the decoder weights, as XComposer v1's inference
        checkpoints are; the config then describes a model without adapters."""
        if self.config.text_config.lora_scope != "all":
            raise ValueError("only plain LoRA (text_config.lora_scope='all') can be merged; Partial LoRA stays")
        for module in self.modules():
            if isinstance(module, PartialLoRALinear) and module.rank:
                module.merge()
        self.config.text_config.lora_rank = 0

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.FloatTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0,
                num_logits_to_keep: int | None = None,  # the 4.45-4.49 name of logits_to_keep
                image_grid: torch.LongTensor | None = None,
                **kwargs) -> XComposerCausalLMOutput | tuple:
        """XComposerModel's forward (the same arguments), then the LM head and, with `labels`, the loss."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        cache = cache_argument(cache, past_key_values, f"{type(self).__name__}.forward")
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True, image_grid=image_grid,
                             **kwargs)
        hidden = outputs.last_hidden_state
        keep = num_logits_to_keep if num_logits_to_keep is not None else logits_to_keep
        if isinstance(keep, int):
            hidden = hidden[:, -keep:] if keep else hidden
        else:
            hidden = hidden[:, keep]
        logits = self.output(hidden)
        image_id = self.config.image_token_id
        if image_id < logits.shape[-1]:
            # The image id is a row of resized embeddings: it marks positions and is never a prediction.
            logits = logits.index_fill(-1, logits.new_tensor([image_id], dtype=torch.long), torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = causal_lm_loss(logits, labels, image_id, input_ids, **loss_kwargs)
        output = XComposerCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions, image_hidden_states=outputs.image_hidden_states,
                                         image_outputs=outputs.image_outputs,
                                         **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return output if (return_dict_default(self.config) if return_dict is None else return_dict) else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      pixel_values=None, position_ids=None, use_cache=True, cache=None,
                                      image_grid=None, **kwargs):
        """One generation step's inputs, the same on every transformers release: the tokens the cache has not
        seen, the images and inputs_embeds at the prefill only, position ids from the padding mask, and, for a
        fixed-length (static) cache, a full-width boolean mask so that compiled decode steps see fixed shapes."""
        cache = cache if cache is not None else past_key_values
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        model_inputs = {}
        if past_length:
            # The tokens the cache has not seen. A prompt given as inputs_embeds is not in input_ids, which then holds
            # the generated tokens only; the padding mask (or 5.x's position ids) spans the whole sequence.
            total = input_ids.shape[1]
            if attention_mask is not None and attention_mask.ndim == 2:
                total = attention_mask.shape[1]
            elif position_ids is not None:
                total = position_ids.shape[-1]
            unseen = total - past_length
            input_ids, inputs_embeds = input_ids[:, input_ids.shape[1] - unseen:], None
            pixel_values, image_grid = None, None
        if inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:  # fresh strides: a slice keeps the whole sequence's, which grow every step (compile guards on them)
            model_inputs["input_ids"] = input_ids.clone(memory_format=torch.contiguous_format)
        length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        device = (inputs_embeds if inputs_embeds is not None else input_ids).device
        if position_ids is not None:  # 5.x generate tracks them over the whole sequence
            position_ids = position_ids[:, -length:]
        elif attention_mask is not None and attention_mask.ndim == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            position_ids = torch.arange(past_length, past_length + length, device=device)[None]
        position_ids = position_ids.clone(memory_format=torch.contiguous_format)  # as input_ids
        capacity = static_cache_length(cache) if cache is not None else None
        if capacity is not None and (attention_mask is None or attention_mask.ndim == 2):
            attention_mask = causal_mask(attention_mask, length, past_length, capacity, device)
        # Static caches before transformers 5.5 write at cache_position; generate passes it there, not after.
        cache_position = kwargs.pop("cache_position", None)
        if cache_position is None or cache_position.shape[0] != length:
            cache_position = torch.arange(past_length, past_length + length, device=device)
        model_inputs.update(attention_mask=attention_mask, position_ids=position_ids, pixel_values=pixel_values,
                            use_cache=use_cache, cache_position=cache_position, **{CACHE_FIELD: cache})
        if image_grid is not None:
            model_inputs["image_grid"] = image_grid
        kwargs.pop("next_sequence_length", None)
        kwargs.pop("is_first_iteration", None)
        return {**kwargs, **model_inputs}

    @torch.no_grad()
    def chat(self, processor, query: str, images=None, history=(), system: str | None = None, streamer=None,
             max_new_tokens: int = 1024, do_sample: bool = False, **generate_kwargs) -> tuple[str, list]:
        """One chat turn, as upstream's `model.chat`: returns (response, history + [(query, response, images)]).

        `processor` is an XComposerProcessor or a plain tokenizer; `images` one image (PIL, path, URL, array) or
        a list. Without `<ImageHere>` in the query, one placeholder per image is put in front of it. Decoding is
        greedy unless `do_sample=True`, and stops at eos or the end-of-turn piece. `system` replaces v2's default
        system prompt ("" for none). History turns are (query, response) or (query, response, images). The
        query, history and system text are encoded as plain text: chat markers in them stay characters.

        High-resolution models (XComposer-2.5) build the prompt as upstream 2.5 does: no system turn unless
        `system` is given; when the whole conversation has exactly one image and no `<ImageHere>`, the image goes
        in front of the whole prompt (before any system turn, after BOS); each image gets at most `hd_num` tiles
        (config.hd_num for one image, config.hd_num_multi each for several; `hd_num=` overrides)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        images = _as_list(images)
        leads = self._image_leads(query, images, history)
        if images and IMAGE_PLACEHOLDER not in query and not leads:
            query = IMAGE_PLACEHOLDER * len(images) + query
        messages = [] if system is None else [{"role": "system", "content": system}]
        all_images = []
        for turn in history:  # a turn remembers its images
            if not isinstance(turn, (list, tuple)) or len(turn) not in (2, 3):
                raise ValueError(f"a history turn is (query, response) or (query, response, images), got {turn!r}")
            earlier = _as_list(turn[2]) if len(turn) == 3 else []
            content = turn[0]
            if self.config.dynamic_tiles and earlier and not leads and IMAGE_PLACEHOLDER not in content:
                content = IMAGE_PLACEHOLDER * len(earlier) + content  # its image led, but no longer is the only one
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn[1]}]
            all_images += earlier
        messages.append({"role": "user", "content": query})
        response = self.reply(processor, messages, [*all_images, *images], streamer=streamer,
                              max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
        return response, [*history, (query, response, images)]

    def _image_leads(self, query: str, images: list, history) -> bool:
        """XComposer-2.5's rule: a conversation with one image and no placeholder shows the image before the whole
        prompt (the processor puts it there), not in front of the query."""
        if not self.config.dynamic_tiles:
            return False
        turns = [turn for turn in history if isinstance(turn, (list, tuple)) and len(turn) in (2, 3)]
        earlier = [image for turn in turns if len(turn) == 3 for image in _as_list(turn[2])]
        texts = [query, *(str(turn[0]) for turn in turns)]
        return len(images) + len(earlier) == 1 and not any(IMAGE_PLACEHOLDER in text for text in texts)

    @torch.no_grad()
    def reply(self, processor, prompt, images=(), prefill: str = "", streamer=None, max_new_tokens: int = 1024,
              raw_content: bool = False, **generate_kwargs) -> str:
        """The model's answer to `prompt`, decoded without its stop pieces: the reply loop that `chat` and
        interleaved composition share. `prompt` is a list of chat messages, rendered with the processor's chat
        template and their text encoded as plain text (`raw_content=True` lets markers in it act), or an already
        rendered prompt string, used as is. `prefill` starts the answer. `images` fill the `<ImageHere>`
        placeholders in order. Generation stops at the processor's stop ids and within the model's context.
        High-resolution models take `hd_num=` (the tile budget of each image) for the processor."""
        if not isinstance(processor, ProcessorMixin):  # a tokenizer (the processor class may be another copy)
            processor = XComposerProcessor.for_model(self.config, processor)
        images = _as_list(images)
        image_kwargs = {"hd_num": generate_kwargs.pop("hd_num")} if "hd_num" in generate_kwargs else {}
        if isinstance(prompt, str):
            inputs = processor(text=prompt + prefill, images=images or None, **image_kwargs)
        else:
            messages = [*prompt, {"role": "assistant", "content": prefill}] if prefill else list(prompt)
            inputs = processor.apply_chat_template(messages, images=images, add_generation_prompt=not prefill,
                                                   continue_final_message=bool(prefill), tokenize=True,
                                                   return_dict=True, raw_content=raw_content, **image_kwargs)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokenizer, stop = processor.tokenizer, processor.stop_token_ids
        length, limit = inputs["input_ids"].shape[1], self.config.text_config.max_sequence_length
        if length >= limit:
            raise ValueError(f"prompt too long: {length} tokens leave no room to reply within the model's "
                             f"maximum length of {limit}")
        # Embedding rows past the tokenizer's pieces (v1 pads its vocabulary) cannot be decoded: never emit them.
        unused = range(len(tokenizer), self.config.text_config.vocab_size)
        if len(unused):
            generate_kwargs.setdefault("suppress_tokens", list(unused))
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = self.generate(**inputs, streamer=streamer, max_new_tokens=min(max_new_tokens, limit - length),
                               eos_token_id=stop, **generate_kwargs)
        new_tokens = output[0, length:].tolist()
        while new_tokens and new_tokens[-1] in stop:
            new_tokens.pop()
        return tokenizer.decode(new_tokens, skip_special_tokens=True)


def _as_list(images) -> list:
    return [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]


XComposerModel.register_for_auto_class("AutoModel")
XComposerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
