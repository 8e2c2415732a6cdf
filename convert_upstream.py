"""Upstream InternLM-XComposer checkpoints (v1 2023, XComposer2 2024) -> a complete folder of ours.

    python convert_checkpoint.py SRC DST

The format is detected from SRC/config.json; `detect_format` answers with the connector ("perceive_sampler"
for v1, "mlp2x_gelu" for XComposer2). XComposer-2.5 and 4KHD are XComposer2 checkpoints whose tensors include
the tile separators (`plora_glb_GN`); their tile size and the projector's merged input width come from the
tensors, and the image behaviour (padding, clamp, tile budgets) from the tile size: 560 px is XComposer-2.5
(the code that ran: bottom padding, clamp, 24 / 6 tiles), 336 px XComposer2-4KHD (centred, no clamp, 25).
The mapping is a set of key tables, one row per upstream tensor, plus
a few layout fixes: InternLM2's per-KV-group wqkv is reordered to [Q; K; V], CLIP's and InternLM's q/k/v are
fused, and v1's plain LoRA is folded into its weights in fp32. Sizes that upstream config.json files do not
carry come from tensor shapes; the sizes they do carry are checked against the tensors before any model is
built, so a config that lies fails at once, naming the field. The tables, the size rules and the output
files are shared with convert_components.py (fresh models) and export_upstream.py (the way back).
"""

import copy
import math
import os
import re
import sys

import torch
from transformers.activations import ACT2FN

from checkpoint_io import (DEFAULT_SHARD_SIZE, Checkpoint, ConversionError, ConversionResult, Rules, ShapesOnly,
                           ShardWriter, check_destination, key_table, output_folder, parse_dtype, parse_size, plan,
                           planned_bytes, progress_bar, read_json, source_dtype, write_tensors)
from configuration_xcomposer import HD_MERGE, LORA_TARGETS, PRESETS, XComposerConfig
from model_folder import write_folder_files
from modeling_xcomposer import XComposerForCausalLM, interpolate_pos_embed
from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer
from transformers_compat import DTYPE_ARG

UPSTREAM_NAMES = {"perceive_sampler": "XComposer v1", "mlp2x_gelu": "XComposer2"}
HD_NAME = "XComposer-2.5 / 4KHD"
HD_SENTINEL = "plora_glb_GN"  # only the high-resolution models have the tile separators
# OmniLive's 2.5 base carries a video-memory projector that the image path never reads.
HD_IGNORED = ("video_mem_proj.",)
# The image behaviour fixed in each upstream copy's code, by tile size (facts page UPSTREAM_FORMATS_HD.md):
# 336 px is 4KHD (centred padding, no clamp; hd_num 25 as its evaluation wrappers, a choice); any other tile is
# treated as XComposer-2.5 (560 px), whose code ran.
HD_BEHAVIOUR = {336: dict(hd_num=25, hd_num_multi=25, hd_padding="center", hd_clamp=False)}
HD_DEFAULT_BEHAVIOUR = dict(hd_num=24, hd_num_multi=6, hd_padding="bottom", hd_clamp=True)
VT, PS, LM = "model.vision_tower.", "model.perceive_sampler.", "model.language_model."
UPSTREAM_CLIP = "vit.vision_tower.vision_model."
V1_ADDED_TOKENS = ["<ITG_TOKEN>", "<SOI_TOKEN>"]  # upstream v1's vocabulary = sentencepiece pieces + these two
# Upstream v1's internlm_lora.learn_param entries -> the InternLM linears (below a layer) that carry LoRA.
V1_LEARN_PARAM = {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
                  "o": ["self_attn.o_proj"], "ffn": ["mlp.up_proj", "mlp.down_proj"]}

# --------------------------------------------------------------------------- key tables
# Rows: upstream name, our name, and for one piece of a fused tensor its part (see checkpoint_io.key_table).

CLIP_KEYS = """                                               # below the CLIP prefix -> model.vision_tower.
embeddings.class_embedding              embeddings.cls_token
embeddings.patch_embedding.weight       embeddings.patch_embed.weight
embeddings.position_embedding.weight    embeddings.pos_embed
embeddings.position_ids                 -
pre_layrnorm.*                          pre_norm.*
post_layernorm.*                        -                     # XComposer2 reads the last layer before it
encoder.layers.{}.layer_norm1.*         blocks.{}.norm1.*
encoder.layers.{}.self_attn.q_proj.*    blocks.{}.attn.qkv.*  q
encoder.layers.{}.self_attn.k_proj.*    blocks.{}.attn.qkv.*  k
encoder.layers.{}.self_attn.v_proj.*    blocks.{}.attn.qkv.*  v
encoder.layers.{}.self_attn.out_proj.*  blocks.{}.attn.proj.*
encoder.layers.{}.layer_norm2.*         blocks.{}.norm2.*
encoder.layers.{}.mlp.fc1.*             blocks.{}.mlp.fc1.*
encoder.layers.{}.mlp.fc2.*             blocks.{}.mlp.fc2.*
"""
PROJECTOR_KEYS = """                                          # the XComposer2 MLP projector
vision_proj.0.*                         model.vision_proj.0.*
vision_proj.2.*                         model.vision_proj.2.*
"""
TILE_KEYS = """                                               # XComposer-2.5 / 4KHD's separators
plora_glb_GN                            model.tile_layout.glb_GN
plora_sub_GN                            model.tile_layout.sub_GN
"""
INTERNLM2_KEYS = """                                          # -> model.language_model.
model.tok_embeddings.weight                    tok_embeddings.weight
model.norm.weight                              norm.weight
model.layers.{}.attention_norm.weight          layers.{}.attention_norm.weight
model.layers.{}.ffn_norm.weight                layers.{}.ffn_norm.weight
model.layers.{}.attention.rotary_emb.inv_freq  -
model.layers.{}.attention.wqkv.*               layers.{}.attention.wqkv.*
model.layers.{}.attention.wo.*                 layers.{}.attention.wo.*
model.layers.{}.feed_forward.w1.*              layers.{}.feed_forward.w1.*
model.layers.{}.feed_forward.w3.*              layers.{}.feed_forward.w3.*
model.layers.{}.feed_forward.w2.*              layers.{}.feed_forward.w2.*
"""
INTERNLM_KEYS = """                                           # below the LLM prefix -> model.language_model.
model.embed_tokens.weight                        tok_embeddings.weight
model.norm.weight                                norm.weight
model.layers.{}.input_layernorm.weight           layers.{}.attention_norm.weight
model.layers.{}.post_attention_layernorm.weight  layers.{}.ffn_norm.weight
model.layers.{}.self_attn.rotary_emb.inv_freq    -
model.layers.{}.self_attn.q_proj.*               layers.{}.attention.wqkv.*  q
model.layers.{}.self_attn.k_proj.*               layers.{}.attention.wqkv.*  k
model.layers.{}.self_attn.v_proj.*               layers.{}.attention.wqkv.*  v
model.layers.{}.self_attn.o_proj.*               layers.{}.attention.wo.*
model.layers.{}.mlp.gate_proj.weight             layers.{}.feed_forward.w1.weight
model.layers.{}.mlp.up_proj.weight               layers.{}.feed_forward.w3.weight
model.layers.{}.mlp.down_proj.weight             layers.{}.feed_forward.w2.weight
"""
EVA_KEYS = """                                                # below the EVA prefix -> model.vision_tower.
cls_token                  embeddings.cls_token
pos_embed                  embeddings.pos_embed
patch_embed.proj.*         embeddings.patch_embed.*
blocks.{}.norm1.*          blocks.{}.norm1.*
blocks.{}.attn.qkv.weight  blocks.{}.attn.qkv.weight
blocks.{}.attn.q_bias      blocks.{}.attn.q_bias              # EVA's qkv bias is [q_bias, 0, v_bias]
blocks.{}.attn.v_bias      blocks.{}.attn.v_bias
blocks.{}.attn.proj.*      blocks.{}.attn.proj.*
blocks.{}.norm2.*          blocks.{}.norm2.*
blocks.{}.mlp.fc1.*        blocks.{}.mlp.fc1.*
blocks.{}.mlp.fc2.*        blocks.{}.mlp.fc2.*
"""
LN_VISION_KEYS = "ln_vision.*  post_norm.*                    # BLIP-2's LayerNorm after EVA"
QFORMER_KEYS = """                                            # Qformer.bert. -> model.perceive_sampler.
embeddings.LayerNorm.*                              layernorm.*
embeddings.position_ids                             -
encoder.layer.{}.attention.self.query.*             layers.{}.self_attn.query.*
encoder.layer.{}.attention.self.key.*               layers.{}.self_attn.key.*
encoder.layer.{}.attention.self.value.*             layers.{}.self_attn.value.*
encoder.layer.{}.attention.output.dense.*           layers.{}.self_attn.dense.*
encoder.layer.{}.attention.output.LayerNorm.*       layers.{}.self_attn.norm.*
encoder.layer.{}.crossattention.self.query.*        layers.{}.cross_attn.query.*
encoder.layer.{}.crossattention.self.key.*          layers.{}.cross_attn.key.*
encoder.layer.{}.crossattention.self.value.*        layers.{}.cross_attn.value.*
encoder.layer.{}.crossattention.output.dense.*      layers.{}.cross_attn.dense.*
encoder.layer.{}.crossattention.output.LayerNorm.*  layers.{}.cross_attn.norm.*
encoder.layer.{}.intermediate_query.dense.*         layers.{}.fc1.*
encoder.layer.{}.output_query.dense.*               layers.{}.fc2.*
encoder.layer.{}.output_query.LayerNorm.*           layers.{}.ffn_norm.*
"""
SAMPLER_KEYS = """                                            # -> model.perceive_sampler.
query_tokens      query_tokens
flag_image_start  flag_image_start
flag_image_end    flag_image_end
internlm_proj.*   internlm_proj.*
"""


def clip_table(prefix: str) -> dict:
    return key_table(CLIP_KEYS, prefix, VT)


def internlm2_table(plora: bool) -> dict:
    """InternLM2 as XComposer2 stores it; with `plora` the Partial LoRA A/B beside every LORA_TARGETS linear."""
    table = {**key_table(INTERNLM2_KEYS, "", LM), "output.weight": "output.weight"}
    if plora:
        for source, target in list(table.items()):
            module = source.removesuffix(".weight")
            if source.endswith(".weight") and module.rsplit(".", 1)[-1] in LORA_TARGETS:
                ours = target.removesuffix(".weight")
                table |= {f"{module}.Plora_{ab}.weight": f"{ours}.{ab}.weight" for ab in "AB"}
    return table


def internlm_table(prefix: str, lora_modules=()) -> dict:
    """InternLM (v1); the LoRA matrices of `lora_modules` become parts of the weight they fold into."""
    table = {**key_table(INTERNLM_KEYS, prefix, LM), f"{prefix}lm_head.weight": "output.weight"}
    for module in lora_modules:
        source = f"{prefix}model.layers.{{}}.{module}"
        entry = table[f"{source}.weight"]
        target, part = entry if isinstance(entry, tuple) else (entry, "")
        for ab in "AB":
            table[f"{source}.lora_{ab}.weight"] = (target, f"{part}.{ab}" if part else ab)
    return table


def eva_table(prefix: str) -> dict:
    return key_table(EVA_KEYS, prefix, VT)


def ln_vision_table() -> dict:
    return key_table(LN_VISION_KEYS, "", VT)


def qformer_table() -> dict:
    return {**key_table(QFORMER_KEYS, "Qformer.bert.", PS), **key_table(SAMPLER_KEYS, "", PS)}


# --------------------------------------------------------------------------- layout fixes (upstream -> ours)


def concat(parts: str):
    return lambda p: torch.cat([p[k] for k in parts])


def qkv_from_groups(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv rows (per KV group g: its query heads, key head g, value head g) -> [Q; K; V]."""
    per, rest = num_heads // num_kv_heads, w.shape[1:]
    groups = w.reshape(num_kv_heads, per + 2, -1, *rest)  # (KV, per + 2, head_dim, ...)
    q, k, v = groups[:, :per], groups[:, per], groups[:, per + 1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def fold_lora(w, a=None, b=None, scaling=1.0, lora_rank=None):
    """W + scaling * B @ A in fp32 (plain LoRA acts on every token, so this is exact up to rounding)."""
    if a is None:
        return w
    if lora_rank is not None and a.shape[0] != lora_rank:
        raise ValueError(f"LoRA rank {a.shape[0]} differs from internlm_lora.lora_r {lora_rank}")
    if not w.is_meta and not b.any():
        return w  # a zero adapter: keep W bit for bit
    return w.float() + scaling * (b.float() @ a.float())


def clip_fixes(grid: int | None = None) -> dict:
    """CLIP stores the class embedding as (D,) and the position table as (N + 1, D), we (1, 1, D) and
    (1, N + 1, D); `grid` resizes the patch grid (fresh models only); q/k/v fuse into qkv."""
    def pos_embed(p):
        pos = p[""].unsqueeze(0)
        return pos if grid is None else interpolate_pos_embed(pos, grid)
    return {f"{VT}embeddings.cls_token": lambda p: p[""].reshape(1, 1, -1), f"{VT}embeddings.pos_embed": pos_embed,
            f"{VT}blocks.{{}}.attn.qkv.weight": concat("qkv"), f"{VT}blocks.{{}}.attn.qkv.bias": concat("qkv")}


def eva_fixes(grid: int | None = None) -> dict:
    if grid is None:
        return {}
    return {f"{VT}embeddings.pos_embed": lambda p: interpolate_pos_embed(p[""], grid)}


def internlm2_fixes(num_heads: int, num_kv_heads: int) -> dict:
    def regroup(p):  # the PLoRA B matrix of wqkv shares wqkv's row order
        return qkv_from_groups(p[""], num_heads, num_kv_heads)
    return {f"{LM}layers.{{}}.attention.wqkv.{s}": regroup for s in ("weight", "bias", "B.weight")}


def internlm_fixes(table: dict, scaling: float = 1.0, lora_rank: int = 0) -> dict:
    """Fuse q/k/v, folding the LoRA of each part in; fold the LoRA of the other linears of `table`."""
    def fold(p, part=""):
        lora = (lambda ab: f"{part}.{ab}") if part else (lambda ab: ab)
        return fold_lora(p[part], p.get(lora("A")), p.get(lora("B")), scaling, lora_rank)
    wqkv = f"{LM}layers.{{}}.attention.wqkv."
    fixes = {wqkv + "weight": lambda p: torch.cat([fold(p, x) for x in "qkv"]), wqkv + "bias": concat("qkv")}
    for entry in table.values():
        if isinstance(entry, tuple) and entry[1] == "A":
            fixes[entry[0]] = fold
    return fixes


def v1_lora(cfg: dict):
    """(linears with LoRA, scaling, rank) from upstream v1's `internlm_lora`."""
    lora = cfg.get("internlm_lora")
    if not lora:
        return (), 1.0, 0
    if not isinstance(lora, dict):
        raise ConversionError(f"config.json: internlm_lora must be an object, got {lora!r}", ["internlm_lora"])
    learn = lora.get("learn_param", [])
    if not isinstance(learn, list) or not all(isinstance(x, str) for x in learn):
        raise ConversionError(f"config.json: internlm_lora.learn_param must be a list of names, got {learn!r}",
                              ["internlm_lora.learn_param"])
    unknown = sorted(set(learn) - set(V1_LEARN_PARAM))
    if unknown:
        raise ConversionError(f"internlm_lora.learn_param has unknown entries {unknown}", unknown)
    rank = _positive_int(lora, "lora_r", where="config.json: internlm_lora")
    alpha = _positive_number(lora, "lora_alpha", rank, where="config.json: internlm_lora")
    return tuple(m for key in learn for m in V1_LEARN_PARAM[key]), float(alpha) / rank, rank


def upstream_rules(cfg: dict, config: XComposerConfig) -> Rules:
    """The key tables and fixes of an upstream checkpoint (its config.json `cfg`, our `config` of it)."""
    text = config.text_config
    if config.connector == "mlp2x_gelu":
        table = {**clip_table(UPSTREAM_CLIP), **internlm2_table(plora=True), **key_table(PROJECTOR_KEYS)}
        fixes = {**clip_fixes(), **internlm2_fixes(text.num_attention_heads, text.num_key_value_heads)}
        if config.dynamic_tiles:
            return Rules({**table, **key_table(TILE_KEYS)}, fixes, ignore=HD_IGNORED)
        return Rules(table, fixes)
    modules, scaling, rank = v1_lora(cfg)
    llm = internlm_table("internlm_model.", modules)
    table = {**eva_table("visual_encoder."), **ln_vision_table(), **qformer_table(), **llm}
    return Rules(table, internlm_fixes(llm, scaling, rank))


# --------------------------------------------------------------------------- sizes: config.json checked against tensors


def detect_format(cfg: dict) -> str:
    """"perceive_sampler" (XComposer v1), "mlp2x_gelu" (XComposer2) or "ours", from model_type / architectures."""
    model_type, architectures = cfg.get("model_type", ""), cfg.get("architectures") or []
    if not isinstance(model_type, str) or not isinstance(architectures, list):
        raise ConversionError(f"config.json: model_type {model_type!r} or architectures {architectures!r} is "
                              f"not a name or a list of names")
    if model_type == "xcomposer":
        return "ours"
    if model_type.lower() == "internlmxcomposer" or "InternLMXComposerForCausalLM" in architectures:
        return "perceive_sampler"
    if model_type == "internlmxcomposer2" or "InternLMXComposer2ForCausalLM" in architectures:
        return "mlp2x_gelu"
    raise ConversionError(f"not an XComposer checkpoint: model_type {model_type!r}, architectures {architectures}")


def _positive_int(cfg: dict, key: str, default=None, where="config.json"):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{where}: {key} must be a positive integer, got {value!r}", [key])
    return value


def _positive_number(cfg: dict, key: str, default=None, where="config.json"):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConversionError(f"{where}: {key} must be a positive number, got {value!r}", [key])
    return value


def _flag(cfg: dict, key: str, default: bool, where="config.json") -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConversionError(f"{where}: {key} must be true or false, got {value!r}", [key])
    return value


def _matching(cfg: dict, key: str, actual: int, what: str, where="config.json") -> int:
    """A size from config.json that the tensors also fix: it must be a positive integer equal to theirs."""
    value = _positive_int(cfg, key, where=where)
    if value != actual:
        raise ConversionError(f"{where}: {key} is {value}, but the tensors hold {actual} ({what})", [key])
    return value


def _shape(shapes: dict, name: str, ndim: int) -> tuple:
    if name not in shapes:
        raise ConversionError(f"missing tensor {name} (needed to derive the model's sizes)", [name])
    if len(shapes[name]) != ndim:
        raise ConversionError(f"{name} has shape {list(shapes[name])}, expected {ndim} dimensions", [name])
    return tuple(shapes[name])


def count_layers(shapes: dict, prefix: str) -> int:
    """Number of layers under `prefix`; their indices must be 0..n-1 (so a stray index cannot ask for more)."""
    indices = {int(m.group(1)) for name in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
    if not indices:
        raise ConversionError(f"no tensors under {prefix}*", [prefix])
    if max(indices) + 1 != len(indices):
        absent = [i for i in range(len(indices)) if i not in indices]  # bounded by the tensors, not by an index
        raise ConversionError(f"layer indices under {prefix}* are not 0..{len(indices) - 1}: no tensors for "
                              f"{absent[:10]}, but some for {sorted(indices - set(range(len(indices))))[:10]}",
                              [prefix])
    return len(indices)


# The tensors whose shapes fix an LLM's sizes (embedding, layer prefix, first feed-forward), by model_type.
LLM_TENSORS = {"internlm2": ("model.tok_embeddings.weight", "model.layers.", "feed_forward.w1.weight"),
               "internlm": ("model.embed_tokens.weight", "model.layers.", "mlp.gate_proj.weight")}
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def text_config_from(cfg: dict, shapes: dict, llm_type: str, prefix: str = "", rope_theta_default: float = 1e6,
                     where: str = "config.json") -> dict:
    """Our text_config of an InternLM2 / InternLM config.json, each size checked against the tensors."""
    missing = [k for k in SIZE_KEYS if k not in cfg]
    if missing:
        raise ConversionError(f"{where} lacks {missing}", missing)
    embedding, layers, ffn = LLM_TENSORS[llm_type]
    embedding, layers = prefix + embedding, prefix + layers
    vocab, hidden = _shape(shapes, embedding, 2)
    _matching(cfg, "vocab_size", vocab, f"rows of {embedding}", where)
    _matching(cfg, "hidden_size", hidden, f"columns of {embedding}", where)
    _matching(cfg, "num_hidden_layers", count_layers(shapes, layers), f"layers under {layers}", where)
    intermediate = _shape(shapes, f"{layers}0.{ffn}", 2)[0]
    _matching(cfg, "intermediate_size", intermediate, f"rows of {layers}0.{ffn}", where)
    heads = _positive_int(cfg, "num_attention_heads", where=where)
    if hidden % heads:
        raise ConversionError(f"{where}: num_attention_heads {heads} does not divide hidden_size {hidden}",
                              ["num_attention_heads"])
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConversionError(f"{where}: rope_scaling must be an object or null, got {scaling!r}", ["rope_scaling"])
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("dynamic", "default"):
        # Dynamic NTK only acts beyond max_position_embeddings, which our model refuses anyway.
        raise ConversionError(f"unsupported rope_scaling {scaling}", ["rope_scaling"])
    act = check_activation(cfg.get("hidden_act", "silu"), where)
    bos = cfg.get("bos_token_id", 1)
    if isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < vocab:
        raise ConversionError(f"{where}: bos_token_id must be a token id below {vocab}, got {bos!r}", ["bos_token_id"])
    initializer = cfg.get("initializer_range", 0.02)
    if isinstance(initializer, bool) or not isinstance(initializer, (int, float)) or not 0 <= initializer < math.inf:
        raise ConversionError(f"{where}: initializer_range must be a number >= 0, got {initializer!r}",
                              ["initializer_range"])
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, hidden_act=act,
                rms_norm_eps=_positive_number(cfg, "rms_norm_eps", 1e-6, where),
                initializer_range=initializer,
                bos_token_id=bos, pad_token_id=2, eos_token_id=[2])
    if llm_type == "internlm2":
        kv = _positive_int(cfg, "num_key_value_heads", heads, where)
        rows = _shape(shapes, f"{layers}0.attention.wqkv.weight", 2)[0]
        if heads % kv or rows != (heads + 2 * kv) * (hidden // heads):
            raise ConversionError(f"{where}: num_attention_heads {heads} and num_key_value_heads {kv} do not fit "
                                  f"{layers}0.attention.wqkv.weight with {rows} rows",
                                  ["num_attention_heads", "num_key_value_heads"])
        return text | dict(num_key_value_heads=kv,
                           rope_theta=float(_positive_number(cfg, "rope_theta", rope_theta_default, where)),
                           max_position_embeddings=_positive_int(cfg, "max_position_embeddings", 32768, where),
                           attention_bias=_flag(cfg, "bias", False, where))
    v1 = preset_text("perceive_sampler")  # InternLM-7B as XComposer v1 uses it
    return text | dict(num_key_value_heads=heads, rope_theta=v1.rope_theta,  # MHA, rotary base fixed in code
                       max_position_embeddings=_positive_int(cfg, "max_position_embeddings", 2048, where),
                       attention_bias=_flag(cfg, "kqvo_bias", _flag(cfg, "bias", True, where), where),
                       lora_rank=0, lora_scope=v1.lora_scope, lora_targets=list(v1.lora_targets))


def check_activation(act, where: str) -> str:
    if not isinstance(act, str) or act not in ACT2FN:
        raise ConversionError(f"{where}: unknown hidden_act {act!r}", ["hidden_act"])
    return act


def clip_sizes(shapes: dict, prefix: str) -> dict:
    """CLIP sizes from the tensors; heads = width / 64 (CLIP-L's head size, fixed in upstream code); the image
    size is the one the stored position table was made for."""
    width, channels, patch, patch_w = _shape(shapes, f"{prefix}embeddings.patch_embedding.weight", 4)
    if width % 64:
        raise ConversionError(f"CLIP width {width} is not a multiple of the head size 64")
    rows = _shape(shapes, f"{prefix}embeddings.position_embedding.weight", 2)[0]
    grid = math.isqrt(max(rows - 1, 0))
    if grid * grid != rows - 1 or grid == 0:
        raise ConversionError(f"{prefix}embeddings.position_embedding.weight: {rows} rows are not a CLS row plus a "
                              f"square grid of patches", [f"{prefix}embeddings.position_embedding.weight"])
    return dict(variant="clip", hidden_size=width, num_attention_heads=width // 64, patch_size=patch,
                num_hidden_layers=count_layers(shapes, f"{prefix}encoder.layers."), image_size=grid * patch,
                intermediate_size=_shape(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight", 2)[0],
                hidden_act="quick_gelu", layer_norm_eps=1e-5)


def check_image_size(value, vision: dict, where: str, key: str) -> int:
    """An image size from a config file or the command line: a positive multiple of the patch size that the
    stored position table was made for."""
    value = _positive_int({key: value}, key, where=where)
    if value != vision["image_size"]:
        raise ConversionError(f"{where}: {key} is {value}, but the stored position table is for "
                              f"{vision['image_size']} px ({(vision['image_size'] // vision['patch_size']) ** 2} "
                              f"patches of {vision['patch_size']} px)", [key])
    return value


def eva_sizes(shapes: dict, prefix: str) -> dict:
    """EVA ViT-g sizes from the tensors; heads = width // 88 (upstream's rule)."""
    width, _, patch, _ = _shape(shapes, f"{prefix}patch_embed.proj.weight", 4)
    rows = _shape(shapes, f"{prefix}pos_embed", 3)[1]
    grid = math.isqrt(max(rows - 1, 0))
    if grid * grid != rows - 1 or grid == 0:
        raise ConversionError(f"{prefix}pos_embed: {rows} rows are not a CLS row plus a square grid of patches",
                              [f"{prefix}pos_embed"])
    return dict(variant="eva", hidden_size=width, num_attention_heads=width // 88, patch_size=patch,
                num_hidden_layers=count_layers(shapes, f"{prefix}blocks."), image_size=grid * patch,
                intermediate_size=_shape(shapes, f"{prefix}blocks.0.mlp.fc1.weight", 2)[0],
                hidden_act="gelu", layer_norm_eps=1e-6, final_layer_norm_eps=1e-5)


def qformer_sizes(shapes: dict) -> dict:
    """Q-Former sizes from the tensors; heads = hidden / 64 (BERT-base); cross-attention where its keys exist."""
    _, queries, hidden = _shape(shapes, "query_tokens", 3)
    prefix = "Qformer.bert.encoder.layer."
    layers = count_layers(shapes, prefix)
    cross = sorted(i for i in range(layers) if f"{prefix}{i}.crossattention.self.key.weight" in shapes)
    frequency = cross[1] - cross[0] if len(cross) > 1 else layers
    if not cross or set(cross) != set(range(0, layers, frequency)):
        raise ConversionError(f"Q-Former cross-attention in layers {cross} is not every n-th layer from layer 0")
    return dict(hidden_size=hidden, num_attention_heads=hidden // 64, num_hidden_layers=layers,
                intermediate_size=_shape(shapes, f"{prefix}0.intermediate_query.dense.weight", 2)[0],
                cross_attention_frequency=frequency, num_query_tokens=queries, hidden_act="gelu", layer_norm_eps=1e-12,
                encoder_hidden_size=_shape(shapes, f"{prefix}0.crossattention.self.key.weight", 2)[1])


def make_config(**kwargs) -> XComposerConfig:
    try:
        return XComposerConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"the derived configuration is invalid: {err}") from None


def derive_config(cfg: dict, shapes: dict) -> XComposerConfig:
    """Our configuration of an upstream checkpoint (config.json `cfg`, tensor shapes {name: shape}): the
    language-model sizes from config.json, checked against the tensors, the rest (vision tower, Q-Former,
    PLoRA rank) from tensor shapes, as upstream code fixes them."""
    try:
        return _derive_config(cfg, shapes)
    except ConversionError:
        raise
    except (ValueError, TypeError, IndexError) as err:  # e.g. a tensor of the wrong rank
        raise ConversionError(f"cannot derive the model's sizes from the tensor shapes: {err}") from None


def _derive_config(cfg: dict, shapes: dict) -> XComposerConfig:
    connector = detect_format(cfg)
    if connector == "mlp2x_gelu":
        text = text_config_from(cfg, shapes, "internlm2")
        rank = _shape(shapes, "model.layers.0.attention.wqkv.Plora_A.weight", 2)[0]  # upstream fixes alpha = rank
        text |= dict(lora_rank=rank, lora_alpha=float(rank), lora_dropout=0.05, lora_scope="image")
        vision = clip_sizes(shapes, UPSTREAM_CLIP)
        if "img_size" in cfg:
            check_image_size(cfg["img_size"], vision, "config.json", "img_size")
        if HD_SENTINEL in shapes:
            return make_config(connector=connector, vision_config=vision, text_config=text,
                               **hd_fields(cfg, shapes, vision, text))
        return make_config(connector=connector, vision_config=vision, text_config=text)
    if connector == "ours":
        raise ConversionError("this is already a folder of ours")
    text = text_config_from(cfg, shapes, "internlm", prefix="internlm_model.")
    qformer = qformer_sizes(shapes)
    if "num_query_token" in cfg and cfg["num_query_token"] != qformer["num_query_tokens"]:
        raise ConversionError(f"config.json: num_query_token is {cfg['num_query_token']!r}, but query_tokens holds "
                              f"{qformer['num_query_tokens']}", ["num_query_token", "query_tokens"])
    return make_config(connector=connector, vision_config=eva_sizes(shapes, "visual_encoder."),
                       qformer_config=qformer, text_config=text)


def hd_fields(cfg: dict, shapes: dict, vision: dict, text: dict) -> dict:
    """XComposer-2.5 / 4KHD: the projector must take merged tokens (HD_MERGE^2 x the CLIP width); the dynamic NTK
    factor comes from config.json's rope_scaling (it is set in `text`); the image behaviour from the tile size."""
    width = _shape(shapes, "vision_proj.0.weight", 2)[1]
    if width != HD_MERGE**2 * vision["hidden_size"]:
        raise ConversionError(f"vision_proj.0.weight takes {width} features, but the tile separators need "
                              f"{HD_MERGE ** 2} x the CLIP width {vision['hidden_size']}", ["vision_proj.0.weight"])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "dynamic":
        factor = _positive_number(scaling, "factor", where="config.json: rope_scaling")
        if factor < 1:
            raise ConversionError(f"config.json: rope_scaling.factor must be at least 1, got {factor!r}",
                                  ["rope_scaling"])
        text["rope_dynamic_factor"] = float(factor)
    return dict(HD_BEHAVIOUR.get(vision["image_size"], HD_DEFAULT_BEHAVIOUR))


def source_name(config: XComposerConfig) -> str:
    return HD_NAME if config.dynamic_tiles else UPSTREAM_NAMES[config.connector]


def preset_text(connector: str):
    """The text_config of the published full-size model with this connector (its fixed facts: rotary base,
    LoRA placement, end-of-turn id)."""
    name = next(name for name, preset in PRESETS.items() if preset["connector"] == connector)
    return XComposerConfig.from_preset(name).text_config


def expected_shapes(config: XComposerConfig) -> dict:
    """Our parameter names and shapes, from the model built on the meta device (sizes already checked)."""
    with torch.device("meta"):
        model = XComposerForCausalLM(copy.deepcopy(config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# --------------------------------------------------------------------------- tokenizer, processor, output files


def load_tokenizer(folder: str, config: XComposerConfig):
    """InternLMTokenizer from folder/tokenizer.model (None without one); upstream v1 adds two tokens."""
    path = os.path.join(folder, "tokenizer.model")
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is not a regular file", [path])
    try:
        tokenizer = InternLMTokenizer(vocab_file=path)
    except (ValueError, RuntimeError, OSError) as err:
        raise ConversionError(str(err), [path]) from None
    vocab = config.text_config.vocab_size
    if config.connector == "perceive_sampler" and len(tokenizer) == vocab - len(V1_ADDED_TOKENS):
        tokenizer.add_tokens(V1_ADDED_TOKENS)
    if len(tokenizer) > vocab:
        raise ConversionError(f"{path} has {len(tokenizer)} tokens but the embedding only {vocab} rows", [path])
    return tokenizer


def stop_ids(config: XComposerConfig, processor) -> list:
    """[eos, end of turn]: the processor's stop ids; without a tokenizer, the full-size ids of the connector's
    published model where the vocabulary holds them."""
    if processor is not None:
        unknown = processor.tokenizer.unk_token_id
        eos, *rest = processor.stop_token_ids
        return [eos] + [i for i in rest if i != unknown]
    eos, *rest = preset_text(config.connector).eos_token_id
    return [eos] + [i for i in rest if i < config.text_config.vocab_size]


def write_model_files(folder: str, config: XComposerConfig, tokenizer, dtype: torch.dtype):
    """Our config.json (with auto_map) and remote-code modules, tokenizer, processor, generation config."""
    processor = XComposerProcessor.for_model(config, tokenizer) if tokenizer is not None else None
    if processor is None:
        print("note: the source has no tokenizer.model, so the output has no tokenizer or processor", file=sys.stderr)
    config.text_config.eos_token_id = stop_ids(config, processor)
    config.architectures = ["XComposerForCausalLM"]
    setattr(config, DTYPE_ARG, dtype)
    write_folder_files(folder, config, processor, description="Converted with this repository's convert_checkpoint.py; "
                       "numerics identical to the original checkpoint.")


def _plan_conversion(cfg: dict, source, where: str):
    if detect_format(cfg) == "perceive_sampler" and not any(".lora_" in name for name in source.specs):
        cfg = {**cfg, "internlm_lora": None}  # upstream's merge script already folded the LoRA in
    config = derive_config(cfg, source.shapes)
    sources = [(source, upstream_rules(cfg, config))]
    planned, _ = plan(sources, expected_shapes(config), where=where)
    return config, sources, planned


def dry_run(cfg: dict, shapes: dict):
    """A conversion planned at any size without tensors (nothing is allocated): our configuration of an upstream
    config.json `cfg` with tensors of these shapes, and {our name: shape} that converting it writes. Problems
    raise the ConversionError the conversion would."""
    config, _, planned = _plan_conversion(cfg, ShapesOnly(shapes), "the shapes")
    return config, planned


def convert_upstream(src, dst, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE, force: bool = False,
                     quiet: bool = False) -> ConversionResult:
    """An upstream XComposer v1 / XComposer2 folder -> a complete folder of ours."""
    src, dst = str(src), str(dst)
    check_destination(dst, force, src)
    cfg = read_json(os.path.join(src, "config.json"))
    connector = detect_format(cfg)
    if connector == "ours":
        raise ConversionError(f"{src} is already in our format; use --to upstream to export it")
    checkpoint = Checkpoint(src)
    config, sources, planned = _plan_conversion(cfg, checkpoint, src)
    ignored = [name for name in checkpoint.specs if config.dynamic_tiles and name.startswith(HD_IGNORED)]
    if ignored:
        print(f"note: ignoring {len(ignored)} tensors {', '.join(sorted(ignored)[:4])}: OmniLive's video-memory "
              f"projector, which the image path never uses", file=sys.stderr)
    tokenizer = load_tokenizer(src, config)
    dtype = parse_dtype(dtype) or source_dtype(cfg, checkpoint.specs)
    max_bytes = parse_size(max_shard_size)
    with output_folder(dst, force) as tmp, progress_bar(planned_bytes(planned, dtype), f"writing {dst}", quiet) as bar:
        writer = ShardWriter(tmp, max_bytes, progress=bar)
        write_tensors(sources, writer, dtype, planned)
        write_model_files(tmp, config, tokenizer, dtype)
    return ConversionResult(dst, writer.num_tensors, writer.num_params, source_name(config), config)
