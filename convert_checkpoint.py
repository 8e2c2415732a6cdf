#!/usr/bin/env python
"""Convert InternLM-XComposer checkpoints to this repository's format, and back.

    python convert_checkpoint.py SRC DST                      # upstream XComposer v1 / XComposer2 -> ours
    python convert_checkpoint.py --to upstream SRC DST        # ours -> upstream layout (.bin shards)
    python convert_checkpoint.py --from-components --llm DIR --vision DIR [--img-size 490] DST   # fresh v2
    python convert_checkpoint.py --from-components --llm DIR --eva FILE --qformer FILE DST        # fresh v1

Like gpt-fast's converter, the mapping is a table of key templates ("{}" is a layer index): an entry is
our name, None for a derived buffer that is dropped, or (our name, part) for one piece of a tensor built
from several. The few layout fixes (InternLM2's per-KV-group wqkv, fusing q/k/v, merging v1's LoRA) are
small forward/backward function pairs, so the same tables also export back to the upstream layout.
Unknown or missing tensors and shape mismatches are found on the meta device before anything is written.

Untrusted input is read safely: weights with torch.load(weights_only=True, mmap=True) or safetensors,
configs as JSON; nothing from SRC is imported or executed. Tensors stream shard by shard, and DST is
assembled in a temporary folder beside it, then moved into place only when complete.
"""

import argparse
import copy
import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, PreTrainedModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_folder import staged_folder as _staged_folder, write_folder_files  # noqa: E402
from configuration_xcomposer import XComposerConfig  # noqa: E402
from modeling_xcomposer import XComposerForCausalLM, interpolate_pos_embed  # noqa: E402
from processing_xcomposer import XComposerProcessor  # noqa: E402
from tokenization_internlm import InternLMTokenizer  # noqa: E402


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as is; `names` lists the offending tensors or files."""

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_SHARD_SIZE = "5GB"
NAMES = {1: "XComposer v1", 2: "XComposer2"}
# Per decoder family: the piece that ends a bot turn (and its id in the full-size tokenizer), the chat template.
END_OF_TURN = {"internlm2": ("[UNUSED_TOKEN_145]", 92542), "internlm": ("<TOKENS_UNUSED_1>", 103028)}
V1_ADDED_TOKENS = ["<ITG_TOKEN>", "<SOI_TOKEN>"]  # upstream v1's vocabulary = sentencepiece pieces + these two
LINEARS = {"wqkv": "attention.wqkv", "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
           "w3": "feed_forward.w3"}
V1_LEARN_PARAM = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "ffn": ["up_proj", "down_proj"]}

VT, PS, LM = "model.vision_tower", "model.perceive_sampler", "model.language_model"
UPSTREAM_CLIP = "vit.vision_tower.vision_model."


# --------------------------------------------------------------------------- reading checkpoints

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}", [path]) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object", [path])
    return data


def _load_bin(path: str) -> dict:
    """torch.load restricted to tensors (weights_only), memory-mapped when the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read untrusted input is a conversion error
        if zipfile.is_zipfile(path):
            raise ConversionError(f"cannot read {path}: {err}", [path]) from None
        try:  # the legacy (pre-zip) torch.save format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:  # noqa: BLE001
            raise ConversionError(f"cannot read {path} (truncated or not a PyTorch checkpoint): {err2}",
                                  [path]) from None
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        for key in ("model", "state_dict", "module"):  # training checkpoints wrap the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors", [path])
    return state


def _file_specs(path: str) -> dict:
    """name -> (shape, dtype) of the tensors in one file."""
    if not path.endswith(".safetensors"):
        return {name: (tuple(t.shape), t.dtype) for name, t in _load_bin(path).items()}
    try:
        with safe_open(path, "pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES[s.get_dtype()]) for name, s in slices.items()}
    except Exception as err:  # noqa: BLE001
        raise ConversionError(f"cannot read {path} (truncated or not safetensors): {err}", [path]) from None


def _file_tensors(path: str):
    if not path.endswith(".safetensors"):
        yield from _load_bin(path).items()
        return
    with safe_open(path, "pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _weight_files(path: str):
    """The weight files of a folder (through its index when there is one), or a single file.
    Returns (files, index weight map or None)."""
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist", [path])
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if not os.path.isfile(index_path):
            continue
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path} has no weight_map", [index_path])
        files = sorted(set(weight_map.values()), key=str)
        outside = [f for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]
        if outside:
            raise ConversionError(f"{index_path} names files outside its folder: {outside}", outside)
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{index_path} names files that do not exist: {', '.join(missing)}", missing)
        return [os.path.join(path, f) for f in files], weight_map
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)], None
    raise ConversionError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or an index of shards",
                          [path])


class Checkpoint:
    """The tensors of a folder or file: names, shapes and dtypes up front, then the tensors file by file."""

    def __init__(self, path: str):
        self.path = path
        self.files, weight_map = _weight_files(path)
        self.specs, where, twice = {}, {}, []
        for file in self.files:
            for name, spec in _file_specs(file).items():
                if name in self.specs:
                    twice.append(name)
                self.specs[name], where[name] = spec, os.path.basename(file)
        if twice:
            raise ConversionError(f"{path}: tensors stored in more than one file: {sorted(twice)}", sorted(twice))
        if weight_map is not None:
            misplaced = sorted(n for n, f in weight_map.items() if where.get(n) != f)
            if misplaced:
                raise ConversionError(f"{path}: the index lists tensors its files do not hold where it says: "
                                      f"{_listing(misplaced)}", misplaced)

    def tensors(self):
        for file in self.files:
            yield from _file_tensors(file)


# --------------------------------------------------------------------------- key tables and layout fixes


@dataclasses.dataclass
class Fix:
    """A layout fix: `forward` builds our tensor from the upstream parts ({part: tensor}); `backward` splits
    ours back into upstream parts."""

    forward: Callable
    backward: Callable | None = None


class Rules:
    """A key table (source template -> None | target template | (target template, part)) plus the fixes of
    targets built from several parts or changed on the way. Keys starting with `ignore` are dropped."""

    def __init__(self, table: dict, fixes: dict | None = None, ignore=()):
        self.table, self.ignore = table, tuple(ignore)
        self.parts = defaultdict(dict)  # target template -> {part: source template}
        for source, entry in table.items():
            if entry is not None:
                target, part = entry if isinstance(entry, tuple) else (entry, "")
                self.parts[target][part] = source
        self.fixes = {t: f for t, f in (fixes or {}).items() if t in self.parts}

    def inverse(self) -> "Rules":
        """Our names -> upstream names, through the fixes' backward functions."""
        table, fixes = {}, {}
        for target, parts in self.parts.items():
            fix = self.fixes.get(target)
            if fix is None:
                table[target] = parts[""]
                continue
            table[target] = target
            fixes[target] = Fix(lambda p, fix=fix, parts=parts: {parts[k]: v for k, v in fix.backward(p[""]).items()})
        return Rules(table, fixes)


_LAYER_INDEX = re.compile(r"\.(layers|layer|blocks)\.(\d+)\.")


def _template(name: str):
    """'a.layers.3.b' -> ('a.layers.{}.b', '3'); a name without a layer index -> (name, None)."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return name, None
    return f"{name[:m.start()]}.{m.group(1)}.{{}}.{name[m.end():]}", m.group(2)


def _fill(template: str, index) -> str:
    return template if index is None else template.format(index)


class Mapper:
    """Feeds source tensors through Rules; yields each target as soon as all its parts have arrived."""

    def __init__(self, rules: Rules):
        self.rules, self.pending, self.origins = rules, {}, {}
        self.unknown, self.failed = [], []

    def feed(self, name: str, tensor: torch.Tensor) -> list:
        if self.rules.ignore and name.startswith(self.rules.ignore):
            return []
        template, index = _template(name)
        if template not in self.rules.table:
            self.unknown.append(name)
            return []
        entry = self.rules.table[template]
        if entry is None:
            return []  # a derived buffer
        target, part = entry if isinstance(entry, tuple) else (entry, "")
        parts = self.pending.setdefault((target, index), {})
        parts[part] = tensor
        self.origins.setdefault((target, index), []).append(name)
        if len(parts) < len(self.rules.parts[target]):
            return []
        del self.pending[(target, index)]
        return self._assemble(target, index, parts)

    def _assemble(self, target, index, parts) -> list:
        fix, origin = self.rules.fixes.get(target), self.origins.pop((target, index))
        try:
            out = fix.forward(parts) if fix else parts[""]
        except (RuntimeError, ValueError, IndexError) as err:
            self.failed.append(f"{', '.join(origin)}: {err}")
            return []
        outs = out.items() if isinstance(out, dict) else [(target, out)]
        return [(_fill(t, index), tensor, origin) for t, tensor in outs]

    def incomplete(self) -> list:
        """Source names of the missing parts of targets that were started but never completed."""
        return sorted(_fill(self.rules.parts[t][p], i) for (t, i), parts in self.pending.items()
                      for p in self.rules.parts[t] if p not in parts)

    def pending_targets(self) -> set:
        return {_fill(t, i) for t, i in self.pending}


def _wb(pairs) -> dict:
    """Module renames -> entries for their weight and bias (an entry for an absent bias never fires)."""
    return {f"{s}.{p}": f"{d}.{p}" for s, d in pairs for p in ("weight", "bias")}


def _concat(parts: str) -> Fix:
    return Fix(lambda p: torch.cat([p[k] for k in parts]), lambda t: dict(zip(parts, t.chunk(len(parts)))))


def qkv_from_groups(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv rows (per KV group g: its query heads, key head g, value head g) -> [Q; K; V]."""
    per, rest = num_heads // num_kv_heads, w.shape[1:]
    groups = w.reshape(num_kv_heads, per + 2, -1, *rest)  # (KV, per + 2, head_dim, ...)
    q, k, v = groups[:, :per], groups[:, per], groups[:, per + 1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def groups_from_qkv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[Q; K; V] rows -> InternLM2's per-KV-group packing (the inverse of qkv_from_groups)."""
    per, rest = num_heads // num_kv_heads, w.shape[1:]
    head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = w.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
    groups = torch.cat([q.reshape(num_kv_heads, per, head_dim, *rest), k.reshape(num_kv_heads, 1, head_dim, *rest),
                        v.reshape(num_kv_heads, 1, head_dim, *rest)], dim=1)
    return groups.reshape(-1, *rest)


def merge_lora(w, a=None, b=None, scaling=1.0, rank=None):
    """W + scaling * B @ A in fp32 (plain LoRA acts on every token, so this is exact up to rounding)."""
    if a is None:
        return w
    if rank is not None and a.shape[0] != rank:
        raise ValueError(f"LoRA rank {a.shape[0]} differs from the configured lora_r {rank}")
    if not w.is_meta and not b.any():
        return w  # a zero adapter: keep W bit for bit
    return w.float() + scaling * (b.float() @ a.float())


def _regroup_fix(num_heads, num_kv_heads) -> Fix:
    return Fix(lambda p: qkv_from_groups(p[""], num_heads, num_kv_heads),
               lambda t: {"": groups_from_qkv(t, num_heads, num_kv_heads)})


def _pos_embed_fix(unbatched: bool, grid: int | None = None) -> Fix:
    """CLIP stores (N + 1, D), EVA and we (1, N + 1, D); `grid` resizes the patch grid (components only)."""
    def forward(p):
        pos = p[""].unsqueeze(0) if unbatched else p[""]
        return pos if grid is None else interpolate_pos_embed(pos, grid)
    return Fix(forward, lambda t: {"": t.squeeze(0) if unbatched else t})


def clip_table(prefix: str) -> dict:
    layer, block = f"{prefix}encoder.layers.{{}}", f"{VT}.blocks.{{}}"
    table = {
        f"{prefix}embeddings.class_embedding": f"{VT}.embeddings.cls_token",
        f"{prefix}embeddings.patch_embedding.weight": f"{VT}.embeddings.patch_embed.weight",
        f"{prefix}embeddings.position_embedding.weight": f"{VT}.embeddings.pos_embed",
        f"{prefix}embeddings.position_ids": None,
        f"{prefix}post_layernorm.weight": None,  # XComposer2 uses the last layer before post_layernorm
        f"{prefix}post_layernorm.bias": None,
        **_wb([(f"{prefix}pre_layrnorm", f"{VT}.pre_norm"), (f"{layer}.layer_norm1", f"{block}.norm1"),
               (f"{layer}.self_attn.out_proj", f"{block}.attn.proj"), (f"{layer}.layer_norm2", f"{block}.norm2"),
               (f"{layer}.mlp.fc1", f"{block}.mlp.fc1"), (f"{layer}.mlp.fc2", f"{block}.mlp.fc2")]),
    }
    for p in ("weight", "bias"):
        for x in "qkv":
            table[f"{layer}.self_attn.{x}_proj.{p}"] = (f"{block}.attn.qkv.{p}", x)
    return table


def clip_fixes(grid: int | None = None) -> dict:
    return {f"{VT}.embeddings.cls_token": Fix(lambda p: p[""].reshape(1, 1, -1), lambda t: {"": t.reshape(-1)}),
            f"{VT}.embeddings.pos_embed": _pos_embed_fix(True, grid),
            f"{VT}.blocks.{{}}.attn.qkv.weight": _concat("qkv"), f"{VT}.blocks.{{}}.attn.qkv.bias": _concat("qkv")}


def internlm2_table(plora: bool) -> dict:
    layer, ours = "model.layers.{}", f"{LM}.layers.{{}}"
    table = {
        "model.tok_embeddings.weight": f"{LM}.tok_embeddings.weight",
        "model.norm.weight": f"{LM}.norm.weight",
        "output.weight": "output.weight",
        f"{layer}.attention_norm.weight": f"{ours}.attention_norm.weight",
        f"{layer}.ffn_norm.weight": f"{ours}.ffn_norm.weight",
        f"{layer}.attention.rotary_emb.inv_freq": None,
    }
    for name in LINEARS.values():
        table |= _wb([(f"{layer}.{name}", f"{ours}.{name}")])
        if plora:
            table[f"{layer}.{name}.Plora_A.weight"] = f"{ours}.{name}.A.weight"
            table[f"{layer}.{name}.Plora_B.weight"] = f"{ours}.{name}.B.weight"
    return table


def internlm2_fixes(num_heads: int, num_kv_heads: int) -> dict:
    regroup = _regroup_fix(num_heads, num_kv_heads)  # the PLoRA B matrix of wqkv shares wqkv's row order
    return {f"{LM}.layers.{{}}.attention.wqkv.{s}": regroup for s in ("weight", "bias", "B.weight")}


def v2_rules(config: XComposerConfig, clip_prefix=UPSTREAM_CLIP, plora=True, grid=None, ignore=()) -> Rules:
    text = config.text_config
    table = {**clip_table(clip_prefix), **internlm2_table(plora),
             **_wb([("vision_proj.0", "model.vision_proj.0"), ("vision_proj.2", "model.vision_proj.2")])}
    fixes = {**clip_fixes(grid), **internlm2_fixes(text.num_attention_heads, text.num_key_value_heads)}
    return Rules(table, fixes, ignore)


LN_VISION = _wb([("ln_vision", f"{VT}.post_norm")])  # BLIP-2's LayerNorm after EVA: our vision tower's post_norm


def eva_table(prefix: str) -> dict:
    src, block = f"{prefix}blocks.{{}}", f"{VT}.blocks.{{}}"
    return {
        f"{prefix}cls_token": f"{VT}.embeddings.cls_token",
        f"{prefix}pos_embed": f"{VT}.embeddings.pos_embed",
        f"{src}.attn.qkv.weight": f"{block}.attn.qkv.weight",
        f"{src}.attn.q_bias": f"{block}.attn.q_bias",  # EVA's qkv bias is [q_bias, 0, v_bias]
        f"{src}.attn.v_bias": f"{block}.attn.v_bias",
        **_wb([(f"{prefix}patch_embed.proj", f"{VT}.embeddings.patch_embed"), (f"{src}.norm1", f"{block}.norm1"),
               (f"{src}.attn.proj", f"{block}.attn.proj"), (f"{src}.norm2", f"{block}.norm2"),
               (f"{src}.mlp.fc1", f"{block}.mlp.fc1"), (f"{src}.mlp.fc2", f"{block}.mlp.fc2")]),
        **LN_VISION,
    }


def qformer_table() -> dict:
    src, ours = "Qformer.bert.encoder.layer.{}", f"{PS}.layers.{{}}"
    pairs = [("Qformer.bert.embeddings.LayerNorm", f"{PS}.layernorm"), ("internlm_proj", f"{PS}.internlm_proj"),
             (f"{src}.intermediate_query.dense", f"{ours}.fc1"), (f"{src}.output_query.dense", f"{ours}.fc2"),
             (f"{src}.output_query.LayerNorm", f"{ours}.ffn_norm")]
    for upstream, attn in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        pairs += [(f"{src}.{upstream}.self.{x}", f"{ours}.{attn}.{x}") for x in ("query", "key", "value")]
        pairs += [(f"{src}.{upstream}.output.dense", f"{ours}.{attn}.dense"),
                  (f"{src}.{upstream}.output.LayerNorm", f"{ours}.{attn}.norm")]
    return {"query_tokens": f"{PS}.query_tokens", "flag_image_start": f"{PS}.flag_image_start",
            "flag_image_end": f"{PS}.flag_image_end", "Qformer.bert.embeddings.position_ids": None, **_wb(pairs)}


def internlm_table(prefix: str, lora_projs=()) -> dict:
    """InternLM (v1): q/k/v fuse into wqkv; LoRA matrices on `lora_projs` become parts of the weight they merge into."""
    layer, ours = f"{prefix}model.layers.{{}}", f"{LM}.layers.{{}}"
    table = {
        f"{prefix}model.embed_tokens.weight": f"{LM}.tok_embeddings.weight",
        f"{prefix}model.norm.weight": f"{LM}.norm.weight",
        f"{prefix}lm_head.weight": "output.weight",
        f"{layer}.input_layernorm.weight": f"{ours}.attention_norm.weight",
        f"{layer}.post_attention_layernorm.weight": f"{ours}.ffn_norm.weight",
        f"{layer}.self_attn.rotary_emb.inv_freq": None,
        **_wb([(f"{layer}.self_attn.o_proj", f"{ours}.attention.wo")]),
        f"{layer}.mlp.gate_proj.weight": f"{ours}.feed_forward.w1.weight",
        f"{layer}.mlp.up_proj.weight": f"{ours}.feed_forward.w3.weight",
        f"{layer}.mlp.down_proj.weight": f"{ours}.feed_forward.w2.weight",
    }
    for x in "qkv":
        table[f"{layer}.self_attn.{x}_proj.weight"] = (f"{ours}.attention.wqkv.weight", x)
        table[f"{layer}.self_attn.{x}_proj.bias"] = (f"{ours}.attention.wqkv.bias", x)
    for proj in lora_projs:
        source = f"{layer}.{'mlp' if proj.endswith(('up_proj', 'down_proj', 'gate_proj')) else 'self_attn'}.{proj}"
        entry = table[f"{source}.weight"]
        target, part = entry if isinstance(entry, tuple) else (entry, "")
        table[f"{source}.lora_A.weight"] = (target, f"{part}.A".lstrip("."))
        table[f"{source}.lora_B.weight"] = (target, f"{part}.B".lstrip("."))
    return table


def internlm_fixes(lora_projs=(), scaling=1.0, rank=0) -> dict:
    """Fuse q/k/v (merging their LoRA in fp32); backward splits and writes zero LoRA matrices of `rank`."""
    lora_parts = {p[0] for p in lora_projs if p in ("q_proj", "k_proj", "v_proj")}

    def zeros(t, part):
        return {part: t, f"{part}.A".lstrip("."): t.new_zeros(rank, t.shape[1]),
                f"{part}.B".lstrip("."): t.new_zeros(t.shape[0], rank)}

    def wqkv_forward(p):
        return torch.cat([merge_lora(p[x], p.get(f"{x}.A"), p.get(f"{x}.B"), scaling, rank) for x in "qkv"])

    def wqkv_backward(t):
        out = {}
        for x, chunk in zip("qkv", t.chunk(3)):
            out |= zeros(chunk, x) if x in lora_parts else {x: chunk}
        return out

    merge = Fix(lambda p: merge_lora(p[""], p.get("A"), p.get("B"), scaling, rank), lambda t: zeros(t, ""))
    fixes = {f"{LM}.layers.{{}}.attention.wqkv.weight": Fix(wqkv_forward, wqkv_backward),
             f"{LM}.layers.{{}}.attention.wqkv.bias": _concat("qkv")}
    ours = {"o_proj": "attention.wo", "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3",
            "down_proj": "feed_forward.w2"}
    for proj in lora_projs:
        if proj in ours:
            fixes[f"{LM}.layers.{{}}.{ours[proj]}.weight"] = merge
    return fixes


def _v1_lora(cfg: dict):
    """(projections with LoRA, scaling, rank) from upstream v1's `internlm_lora`."""
    lora = cfg.get("internlm_lora")
    if not lora:
        return (), 1.0, 0
    unknown = sorted(set(lora.get("learn_param", [])) - set(V1_LEARN_PARAM))
    if unknown:
        raise ConversionError(f"internlm_lora.learn_param has unknown entries {unknown}", unknown)
    projs = tuple(p for key in lora.get("learn_param", []) for p in V1_LEARN_PARAM[key])
    rank = int(lora["lora_r"])
    return projs, float(lora.get("lora_alpha", rank)) / rank, rank


def v1_rules(cfg: dict, eva_prefix="visual_encoder.", llm_prefix="internlm_model.", grid=None, extra=None,
             ignore=()) -> Rules:
    projs, scaling, rank = _v1_lora(cfg)
    table = {**eva_table(eva_prefix), **qformer_table(), **internlm_table(llm_prefix, projs), **(extra or {})}
    fixes = {f"{VT}.embeddings.pos_embed": _pos_embed_fix(False, grid), **internlm_fixes(projs, scaling, rank)}
    return Rules(table, fixes, ignore)


def upstream_rules(version: int, cfg: dict, config: XComposerConfig) -> Rules:
    return v2_rules(config) if version == 2 else v1_rules(cfg)


# --------------------------------------------------------------------------- configs from upstream files and shapes


def detect_format(cfg: dict):
    """1 (XComposer v1), 2 (XComposer2) or "ours", from a config.json's model_type / architectures."""
    model_type, architectures = str(cfg.get("model_type", "")), cfg.get("architectures") or []
    if model_type == "xcomposer":
        return "ours"
    if model_type.lower() == "internlmxcomposer" or "InternLMXComposerForCausalLM" in architectures:
        return 1
    if model_type == "internlmxcomposer2" or "InternLMXComposer2ForCausalLM" in architectures:
        return 2
    raise ConversionError(f"not an XComposer checkpoint: model_type {model_type!r}, architectures {architectures}")


def _shape(specs: dict, name: str) -> tuple:
    if name not in specs:
        raise ConversionError(f"missing tensor {name} (needed to derive the model's sizes)", [name])
    return specs[name][0]


def _count(specs: dict, prefix: str) -> int:
    """Number of layers under `prefix` (highest index + 1, so a gap shows up as missing tensors)."""
    indices = {int(m.group(1)) for name in specs if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
    if not indices:
        raise ConversionError(f"no tensors under {prefix}*", [prefix])
    return max(indices) + 1


def _require(cfg: dict, keys, where="config.json"):
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConversionError(f"{where} lacks {missing}", missing)


def _text_config(cfg: dict, family: str, rope_theta_default: float) -> dict:
    _require(cfg, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("dynamic", "default"):
        # Dynamic NTK only acts beyond max_position_embeddings, which our model refuses anyway.
        raise ConversionError(f"unsupported rope_scaling {scaling}")
    heads = cfg["num_attention_heads"]
    text = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                hidden_act=cfg.get("hidden_act", "silu"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                initializer_range=cfg.get("initializer_range", 0.02), bos_token_id=cfg.get("bos_token_id", 1),
                pad_token_id=2, eos_token_id=[2])
    if family == "internlm2":
        return text | dict(num_key_value_heads=cfg.get("num_key_value_heads", heads),
                           rope_theta=float(cfg.get("rope_theta", rope_theta_default)),
                           max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                           attention_bias=bool(cfg.get("bias", False)))
    return text | dict(num_key_value_heads=heads, rope_theta=1e4,  # InternLM-7B: MHA, rotary base fixed in code
                       max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                       attention_bias=bool(cfg.get("kqvo_bias", cfg.get("bias", True))),
                       lora_rank=0, lora_scope="all", lora_targets=["wqkv", "w2", "w3"])


def _clip_vision(specs: dict, prefix: str, image_size=None) -> dict:
    """CLIP sizes from the tensors; heads = width / 64 (CLIP-L's head size, fixed in upstream code)."""
    width, _, patch, _ = _shape(specs, f"{prefix}embeddings.patch_embedding.weight")
    if width % 64:
        raise ConversionError(f"CLIP width {width} is not a multiple of the head size 64")
    if image_size is None:  # the stored table already has (img_size / patch) ** 2 + 1 rows
        image_size = math.isqrt(_shape(specs, f"{prefix}embeddings.position_embedding.weight")[0] - 1) * patch
    return dict(variant="clip", hidden_size=width, num_attention_heads=width // 64, patch_size=patch,
                num_hidden_layers=_count(specs, f"{prefix}encoder.layers."), image_size=image_size,
                intermediate_size=_shape(specs, f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
                hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _eva_vision(specs: dict, prefix: str) -> dict:
    """EVA ViT-g sizes from the tensors; heads = width // 88 (upstream's rule)."""
    width, _, patch, _ = _shape(specs, f"{prefix}patch_embed.proj.weight")
    grid = math.isqrt(_shape(specs, f"{prefix}pos_embed")[1] - 1)
    return dict(variant="eva", hidden_size=width, num_attention_heads=width // 88, patch_size=patch,
                num_hidden_layers=_count(specs, f"{prefix}blocks."), image_size=grid * patch,
                intermediate_size=_shape(specs, f"{prefix}blocks.0.mlp.fc1.weight")[0],
                hidden_act="gelu", layer_norm_eps=1e-6, final_layer_norm_eps=1e-5)


def _qformer(specs: dict) -> dict:
    """Q-Former sizes from the tensors; heads = hidden / 64 (BERT-base); cross-attention where its keys exist."""
    _, queries, hidden = _shape(specs, "query_tokens")
    prefix = "Qformer.bert.encoder.layer."
    layers = _count(specs, prefix)
    cross = sorted(i for i in range(layers) if f"{prefix}{i}.crossattention.self.key.weight" in specs)
    frequency = cross[1] - cross[0] if len(cross) > 1 else layers
    if not cross or set(cross) != set(range(0, layers, frequency)):
        raise ConversionError(f"Q-Former cross-attention in layers {cross} is not every n-th layer from layer 0")
    return dict(hidden_size=hidden, num_attention_heads=hidden // 64, num_hidden_layers=layers,
                intermediate_size=_shape(specs, f"{prefix}0.intermediate_query.dense.weight")[0],
                cross_attention_frequency=frequency, num_query_tokens=queries, hidden_act="gelu",
                layer_norm_eps=1e-12, encoder_hidden_size=_shape(specs, f"{prefix}0.crossattention.self.key.weight")[1])


def _make_config(**kwargs) -> XComposerConfig:
    try:
        return XComposerConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"the derived configuration is invalid: {err}") from None


def derive_config(version: int, cfg: dict, specs: dict) -> XComposerConfig:
    """Our configuration of an upstream checkpoint: language-model sizes from its config.json, the rest
    (vision tower, Q-Former, PLoRA rank) from tensor shapes, as upstream code fixes them."""
    try:
        return _derive_config(version, cfg, specs)
    except ConversionError:
        raise
    except (ValueError, TypeError, IndexError) as err:  # e.g. a tensor of the wrong rank
        raise ConversionError(f"cannot derive the model's sizes from the tensor shapes: {err}") from None


def _derive_config(version: int, cfg: dict, specs: dict) -> XComposerConfig:
    if version == 2:
        text = _text_config(cfg, "internlm2", rope_theta_default=1e6)
        rank = _shape(specs, "model.layers.0.attention.wqkv.Plora_A.weight")[0]  # upstream fixes alpha = rank
        text |= dict(lora_rank=rank, lora_alpha=float(rank), lora_dropout=0.05, lora_scope="image")
        vision = _clip_vision(specs, UPSTREAM_CLIP, cfg.get("img_size"))
        return _make_config(connector="mlp2x_gelu", vision_config=vision, text_config=text)
    text = _text_config(cfg, "internlm", rope_theta_default=1e4)
    qformer = _qformer(specs)
    if "num_query_token" in cfg and cfg["num_query_token"] != qformer["num_query_tokens"]:
        raise ConversionError(f"config num_query_token {cfg['num_query_token']} but query_tokens holds "
                              f"{qformer['num_query_tokens']}", ["query_tokens"])
    return _make_config(connector="perceive_sampler", vision_config=_eva_vision(specs, "visual_encoder."),
                        qformer_config=qformer, text_config=text)


def _source_dtype(cfg: dict, specs: dict) -> torch.dtype:
    """The config's torch_dtype, else the dominant floating dtype of the tensors."""
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    counts = Counter()
    for shape, dtype in specs.values():
        if dtype.is_floating_point:
            counts[dtype] += math.prod(shape)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def parse_size(size) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, 1000 -> 1000."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConversionError(f"cannot read the size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    power = "_KMGT".index(m.group(2) or "_")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# --------------------------------------------------------------------------- planning and writing


def expected_shapes(config: XComposerConfig) -> dict:
    """Our parameter names and shapes, from the model built on the meta device."""
    with torch.device("meta"):
        model = XComposerForCausalLM(copy.deepcopy(config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _listing(names, limit=40) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _raise_problems(problems: dict, where: str):
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        lines = [f"  {kind} ({len(names)}): {_listing(names)}" for kind, names in problems.items()]
        raise ConversionError(f"cannot convert {where}:\n" + "\n".join(lines),
                              [n for names in problems.values() for n in names])


def plan(sources, expected=None, fresh_ok=(), where="the checkpoint"):
    """Convert shapes only (meta tensors), so every problem is found before anything is written.
    Returns {target: shape} and the expected targets that no source provides but may be freshly initialised."""
    problems, produced, origins, pending = defaultdict(list), {}, {}, set()
    for source, rules in sources:
        mapper = Mapper(rules)
        for name, (shape, dtype) in source.specs.items():
            for target, tensor, origin in mapper.feed(name, torch.empty(shape, dtype=dtype, device="meta")):
                if target in produced:
                    problems["produced twice"].append(target)
                produced[target], origins[target] = tuple(tensor.shape), origin
        problems["unknown tensors"] += mapper.unknown
        problems["missing tensors"] += mapper.incomplete()
        problems["cannot convert"] += mapper.failed
        pending |= mapper.pending_targets()
    fresh = []
    if expected is not None:
        for target, shape in produced.items():
            if target not in expected:
                problems["unknown tensors"] += origins[target]
            elif expected[target] != shape:
                problems["shape mismatch"].append(f"{', '.join(origins[target])} -> {target}: "
                                                  f"got {list(shape)}, expected {list(expected[target])}")
        for target in expected:
            if target in produced or target in pending:
                continue
            if any(fnmatch.fnmatchcase(target, pattern) for pattern in fresh_ok):
                fresh.append(target)
            else:
                problems["missing tensors"].append(_source_names(target, sources))
    _raise_problems(problems, where)
    return produced, fresh


def _source_names(target: str, sources) -> str:
    """The upstream names a missing target is built from (or the target itself when unknown)."""
    template, index = _template(target)
    for _, rules in sources:
        if template in rules.parts:
            return ", ".join(_fill(s, index) for s in rules.parts[template].values())
    return target


class ShardWriter:
    """Writes tensors as they come in shards of at most `max_bytes` (a larger tensor gets a shard of its own),
    then names them HF-style and writes the index; a single safetensors shard is plain model.safetensors."""

    def __init__(self, folder: str, max_bytes: int, fmt: str = "safetensors"):
        self.folder, self.max_bytes, self.fmt = folder, max_bytes, fmt
        self.shard, self.shard_bytes, self.files = {}, 0, []
        self.num_tensors = self.num_params = self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        tensor = tensor.detach().clone(memory_format=torch.contiguous_format)  # own storage, no mmap views
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self._flush()
        self.shard[name] = tensor
        self.shard_bytes += size
        self.num_tensors, self.num_params, self.total_bytes = (
            self.num_tensors + 1, self.num_params + tensor.numel(), self.total_bytes + size)

    def _flush(self):
        path = os.path.join(self.folder, f".shard-{len(self.files) + 1:05d}.tmp")
        if self.fmt == "safetensors":
            save_file(self.shard, path, metadata={"format": "pt"})
        else:
            torch.save(self.shard, path)
        self.files.append((path, sorted(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> set:
        if self.shard or not self.files:
            self._flush()
        base, ext = ("model", "safetensors") if self.fmt == "safetensors" else ("pytorch_model", "bin")
        count, weight_map = len(self.files), {}
        for i, (path, names) in enumerate(self.files, 1):
            single = count == 1 and self.fmt == "safetensors"
            final = f"{base}.{ext}" if single else f"{base}-{i:05d}-of-{count:05d}.{ext}"
            os.replace(path, os.path.join(self.folder, final))
            weight_map |= dict.fromkeys(names, final)
        if len(weight_map) and (count > 1 or self.fmt != "safetensors"):
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.folder, f"{base}.{ext}.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return set(weight_map)


def write_tensors(sources, writer: ShardWriter, dtype: torch.dtype, planned, extra=None):
    """Stream every source through its rules into the writer, casting floating tensors to `dtype`; the names
    written must be exactly the `planned` ones."""
    for source, rules in sources:
        mapper = Mapper(rules)
        for name, tensor in source.tensors():
            for target, out, _ in mapper.feed(name, tensor):
                writer.add(target, out.to(dtype) if out.is_floating_point() else out)
        if mapper.unknown or mapper.pending or mapper.failed:  # the files changed since they were planned
            raise ConversionError(f"{source.path} changed during conversion", mapper.unknown + mapper.incomplete())
    for target, tensor in (extra or {}).items():
        writer.add(target, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    written = writer.close()
    if written != set(planned):
        raise ConversionError(f"wrote other tensors than planned: missing {_listing(sorted(set(planned) - written))}, "
                              f"unplanned {_listing(sorted(written - set(planned)))}")


def _check_destination(dst: str, force: bool, *sources):
    dst = os.path.abspath(dst)
    for src in sources:
        src = os.path.abspath(src)
        if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
            raise ConversionError(f"the destination {dst} would replace the source {src}")
    if os.path.lexists(dst) and not force:
        raise ConversionError(f"{dst} already exists; pass --force to replace it")


def staged_folder(dst: str, force: bool):
    """model_folder.staged_folder, with the converter's error for an existing DST."""
    if os.path.lexists(dst) and not force:
        raise ConversionError(f"{os.path.abspath(dst)} already exists; pass --force to replace it")
    return _staged_folder(dst, replace=force)


@dataclasses.dataclass
class ConversionResult:
    dst: str
    num_tensors: int
    num_params: int
    source: str  # what was converted, e.g. "XComposer2"
    config: object  # our XComposerConfig, or the upstream config.json dict of an export
    layout: str = "ours"

    @property
    def summary(self) -> str:
        where = self.dst if self.layout == "ours" else f"{self.dst} ({self.layout} layout)"
        return f"converted {self.num_tensors} tensors ({self.num_params:,} parameters) from {self.source} to {where}"


# --------------------------------------------------------------------------- tokenizer, processor, generation config


def _load_tokenizer(folder: str, config: XComposerConfig, family: str):
    """InternLMTokenizer from folder/tokenizer.model (None without one); upstream v1 adds two tokens."""
    path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    try:
        tokenizer = InternLMTokenizer(vocab_file=path)
    except ValueError as err:
        raise ConversionError(str(err), [path]) from None
    vocab = config.text_config.vocab_size
    if family == "internlm" and len(tokenizer) == vocab - len(V1_ADDED_TOKENS):
        tokenizer.add_tokens(V1_ADDED_TOKENS)
    if len(tokenizer) > vocab:
        raise ConversionError(f"{path} has {len(tokenizer)} tokens but the embedding only {vocab} rows", [path])
    return tokenizer


def _end_of_turn_ids(tokenizer, config: XComposerConfig, family: str) -> list:
    """[eos, end-of-turn]: the piece's id from the tokenizer when given, else the full-size id if it fits."""
    piece, full_size_id = END_OF_TURN[family]
    if tokenizer is not None:
        eot = tokenizer.sp_model.piece_to_id(piece)
        eot = None if eot == tokenizer.sp_model.unk_id() else eot
    else:
        eot = full_size_id if full_size_id < config.text_config.vocab_size else None
    return [2] if eot is None else [2, eot]


def write_model_files(folder: str, config: XComposerConfig, tokenizer, family: str, dtype: torch.dtype):
    """Our config.json (with auto_map) and remote-code modules, tokenizer, processor, generation config."""
    eos = _end_of_turn_ids(tokenizer, config, family)
    config.text_config.eos_token_id = eos
    config.architectures = ["XComposerForCausalLM"]
    config.dtype = dtype
    processor = None
    if tokenizer is not None:
        processor = XComposerProcessor.for_model(config, tokenizer)
    else:
        print("note: the source has no tokenizer.model, so the output has no tokenizer or processor", file=sys.stderr)
    write_folder_files(folder, config, processor, description="Converted with this repository's convert_checkpoint.py; "
                       "numerics identical to the original checkpoint.")


# --------------------------------------------------------------------------- upstream -> ours


def convert_upstream(src: str, dst: str, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE,
                     force: bool = False) -> ConversionResult:
    """An upstream XComposer v1 / XComposer2 folder -> a complete folder of ours."""
    _check_destination(dst, force, src)
    cfg = _read_json(os.path.join(src, "config.json"))
    version = detect_format(cfg)
    if version == "ours":
        raise ConversionError(f"{src} is already in our format; use --to upstream to export it")
    checkpoint = Checkpoint(src)
    if version == 1 and not any(".lora_" in name for name in checkpoint.specs):
        cfg = {**cfg, "internlm_lora": None}  # upstream's merge script already folded the LoRA in
    config = derive_config(version, cfg, checkpoint.specs)
    family = "internlm2" if version == 2 else "internlm"
    tokenizer = _load_tokenizer(src, config, family)
    sources = [(checkpoint, upstream_rules(version, cfg, config))]
    planned, _ = plan(sources, expected_shapes(config), where=src)
    dtype = _parse_dtype(dtype) or _source_dtype(cfg, checkpoint.specs)
    with staged_folder(dst, force) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        write_tensors(sources, writer, dtype, planned)
        write_model_files(tmp, config, tokenizer, family, dtype)
    return ConversionResult(str(dst), writer.num_tensors, writer.num_params, NAMES[version], config)


# --------------------------------------------------------------------------- raw components -> a fresh model of ours

BLIP2_UNUSED = {  # BLIP-2's text branch and heads: present in its checkpoints, unused by XComposer
    "Qformer.bert.embeddings.word_embeddings.weight": None,
    "Qformer.bert.embeddings.position_embeddings.weight": None,
    **{f"Qformer.bert.encoder.layer.{{}}.{m}.{p}": None for m in ("intermediate.dense", "output.dense",
                                                                  "output.LayerNorm") for p in ("weight", "bias")},
}
BLIP2_IGNORED = ("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.", "temp")
CLIP_MODEL_IGNORED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _llm_family(cfg: dict) -> str:
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in ("internlm2", "internlm"):
        return model_type
    raise ConversionError(f"--llm: expected an InternLM2 or InternLM checkpoint, got model_type {model_type!r}")


def _llm_rules(family: str, text: dict) -> Rules:
    if family == "internlm2":
        return Rules(internlm2_table(plora=False), internlm2_fixes(text["num_attention_heads"],
                                                                   text["num_key_value_heads"]))
    return Rules(internlm_table(""), internlm_fixes())


def _clip_prefix(specs: dict, path: str) -> str:
    """'' for transformers 5's CLIPVisionModel files, 'vision_model.' for older ones and for CLIPModel."""
    for name in specs:
        if name.endswith("embeddings.patch_embedding.weight") and not name.startswith("text_model."):
            return name[: -len("embeddings.patch_embedding.weight")]
    raise ConversionError(f"{path}: no CLIP patch embedding found", [path])


def _clip_component_config(path: str) -> dict:
    """The vision part of a transformers CLIP folder's config.json (read as JSON; defaults of CLIPVisionConfig)."""
    cfg = _read_json(os.path.join(path, "config.json"))
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
    elif cfg.get("model_type") != "clip_vision_model":
        raise ConversionError(f"--vision: expected a CLIPVisionModel folder, got model_type {cfg.get('model_type')!r}")
    defaults = CLIPVisionConfig().to_dict()
    return {k: cfg.get(k, defaults.get(k)) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "image_size", "patch_size",
                                                      "hidden_act", "layer_norm_eps")}


def convert_components(dst: str, llm: str, vision: str | None = None, eva: str | None = None,
                       qformer: str | None = None, img_size: int | None = None, plora_rank: int | None = None,
                       dtype=None, max_shard_size=DEFAULT_SHARD_SIZE, force: bool = False,
                       seed: int = 0) -> ConversionResult:
    """A fresh, untrained model from raw checkpoints: an InternLM2/InternLM LLM plus a CLIP vision tower (v2) or
    EVA ViT-g and BLIP-2 Q-Former state dicts (v1). The connector and (P)LoRA start from our model's init."""
    if bool(vision) == bool(eva or qformer) or (not vision and not (eva and qformer)):
        raise ConversionError("give --vision (XComposer2), or --eva and --qformer (XComposer v1)")
    _check_destination(dst, force, *(p for p in (llm, vision, eva, qformer) if p))
    llm_cfg = _read_json(os.path.join(llm, "config.json"))
    family = _llm_family(llm_cfg)
    text = _text_config(llm_cfg, family, rope_theta_default=1e4)
    llm_checkpoint = Checkpoint(llm)
    sources = [(llm_checkpoint, _llm_rules(family, text))]
    fresh_ok = ["*.A.weight", "*.B.weight"]
    if vision:
        rank = 256 if plora_rank is None else plora_rank
        text |= dict(lora_rank=rank, lora_alpha=float(rank), lora_scope="image", lora_targets=list(LINEARS))
        clip, checkpoint = _clip_component_config(vision), Checkpoint(vision)
        clip |= dict(variant="clip", image_size=img_size or clip["image_size"])
        config = _make_config(connector="mlp2x_gelu", vision_config=clip, text_config=text)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        sources.append((checkpoint, v2_rules(config, _clip_prefix(checkpoint.specs, vision), plora=False, grid=grid,
                                             ignore=CLIP_MODEL_IGNORED)))
        fresh_ok.append("model.vision_proj.*")
        source_name = f"components ({family.upper()} + CLIP)"
    else:
        eva_checkpoint, qformer_checkpoint = Checkpoint(eva), Checkpoint(qformer)
        eva_prefix = "visual_encoder." if any(n.startswith("visual_encoder.") for n in eva_checkpoint.specs) else ""
        eva_config = _eva_vision(eva_checkpoint.specs, eva_prefix)
        eva_config["image_size"] = img_size or eva_config["image_size"]
        if plora_rank:
            text |= dict(lora_rank=plora_rank, lora_alpha=float(plora_rank), lora_scope="all",
                         lora_targets=["wqkv", "w2", "w3"])
        config = _make_config(connector="perceive_sampler", vision_config=eva_config,
                              qformer_config=_qformer(qformer_checkpoint.specs), text_config=text)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        sources += [(eva_checkpoint, Rules(eva_table(eva_prefix), {f"{VT}.embeddings.pos_embed": _pos_embed_fix(False, grid)})),
                    (qformer_checkpoint, Rules({**qformer_table(), **LN_VISION, **BLIP2_UNUSED},
                                               ignore=BLIP2_IGNORED))]
        fresh_ok += [f"{PS}.internlm_proj.*", f"{PS}.flag_image_*", f"{VT}.post_norm.*"]
        source_name = f"components ({family.upper()} + EVA + Q-Former)"
    tokenizer = _load_tokenizer(llm, config, family)
    dtype = _parse_dtype(dtype) or _source_dtype(llm_cfg, llm_checkpoint.specs)
    planned, fresh = plan(sources, expected_shapes(config), fresh_ok, where="the components")
    with staged_folder(dst, force) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        write_tensors(sources, writer, dtype, [*planned, *fresh], extra=fresh_parameters(config, fresh, seed))
        write_model_files(tmp, config, tokenizer, family, dtype)
    return ConversionResult(str(dst), writer.num_tensors, writer.num_params, source_name, config)


def fresh_parameters(config: XComposerConfig, names, seed: int = 0) -> dict:
    """The named parameters as our model initialises them, materialising only the modules that own them."""
    with torch.device("meta"):
        model = XComposerForCausalLM(copy.deepcopy(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for owner in sorted({name.rsplit(".", 1)[0] for name in names}):
            model.get_submodule(owner).to_empty(device="cpu", recurse=False)
            path = owner.split(".")
            for depth in range(len(path), 0, -1):  # the module, then its ancestors: a parent may override (B = 0)
                module = model.get_submodule(".".join(path[:depth]))
                if not isinstance(module, PreTrainedModel):
                    model._init_weights(module)
    state = model.state_dict()
    return {name: state[name].detach() for name in names}


# --------------------------------------------------------------------------- ours -> upstream


def _structure(config: XComposerConfig) -> dict:
    """What fixes the numbers of a forward pass (for checking that an export is faithful)."""
    text, vision = config.text_config, config.vision_config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "rope_theta", "rms_norm_eps", "attention_bias",
            "max_position_embeddings", "lora_rank")
    out = {"connector": config.connector, **{f"text_config.{k}": getattr(text, k) for k in keys}}
    if text.lora_rank:
        out |= {"text_config.lora_scope": text.lora_scope, "text_config.lora_targets": sorted(text.lora_targets),
                "text_config.lora scaling": text.lora_alpha / text.lora_rank}
    vision_keys = ["variant", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "hidden_act", "layer_norm_eps"]
    if vision.variant == "eva":  # CLIP's final norm is absent
        vision_keys.append("final_layer_norm_eps")
    out |= {f"vision_config.{k}": getattr(vision, k) for k in vision_keys}
    if config.qformer_config is not None:
        qformer = config.qformer_config.to_dict()
        out |= {f"qformer_config.{k}": qformer[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "hidden_act", "layer_norm_eps",
                                                           "cross_attention_frequency", "encoder_hidden_size",
                                                           "num_query_tokens")}
    return out


def _linear_part(name: str):
    """'x.wqkv.weight' -> ('x.wqkv', ''), 'x.wqkv.A.weight' -> ('x.wqkv', 'A'); anything else -> (name, None)."""
    if name.endswith((".A.weight", ".B.weight")):
        return name[: -len(".A.weight")], name[-len("A.weight")]
    if name.endswith(".weight"):
        return name[: -len(".weight")], ""
    return name, None


class ExportView:
    """Our checkpoint as the upstream format can hold it: plain LoRA merged into its linears; XComposer2 keeps
    Partial LoRA with scaling 1 (alpha folded into B) or gets zero adapters of `lora_rank` when it has none.
    `config` is the model it then describes."""

    def __init__(self, checkpoint: Checkpoint, config: XComposerConfig, lora_rank: int):
        self.path, self.checkpoint, self.lora_rank = checkpoint.path, checkpoint, lora_rank
        text = config.text_config
        self.config = copy.deepcopy(config)
        canonical = self.config.text_config
        layers = [f"{LM}.layers.{i}" for i in range(text.num_hidden_layers)]
        adapted = {f"{layer}.{LINEARS[t]}" for layer in layers for t in text.lora_targets} if text.lora_rank else set()
        self.merge, self.zero, self.scaling, self.b_scale = set(), set(), 1.0, 1.0
        if text.lora_scope == "all" and text.lora_rank:
            self.merge, self.scaling, canonical.lora_rank = adapted, text.lora_alpha / text.lora_rank, 0
        elif text.lora_rank and config.connector == "perceive_sampler":
            raise ConversionError("XComposer v1 cannot hold Partial LoRA (lora_scope 'image'), and it cannot be merged")
        if config.connector != "perceive_sampler":
            if canonical.lora_rank and sorted(text.lora_targets) != sorted(LINEARS):
                raise ConversionError(f"XComposer2 has Partial LoRA on all of {list(LINEARS)}, this model only on "
                                      f"{text.lora_targets}")
            if canonical.lora_rank:
                self.b_scale = text.lora_alpha / text.lora_rank  # upstream fixes the scaling to 1
            else:
                self.zero = {f"{layer}.{name}" for layer in layers for name in LINEARS.values()}
                canonical.lora_rank = lora_rank
            canonical.lora_alpha, canonical.lora_scope = float(canonical.lora_rank), "image"
            canonical.lora_targets = list(LINEARS)
        self.specs = {}
        for name, (shape, dtype) in checkpoint.specs.items():
            linear, part = _linear_part(name)
            if linear in self.merge and part in ("A", "B"):
                continue
            self.specs[name] = (shape, dtype)
            if linear in self.zero and part == "":
                self.specs[f"{linear}.A.weight"] = ((lora_rank, shape[1]), dtype)
                self.specs[f"{linear}.B.weight"] = ((shape[0], lora_rank), dtype)

    def tensors(self):
        held = defaultdict(dict)
        for name, tensor in self.checkpoint.tensors():
            linear, part = _linear_part(name)
            if linear in self.merge and part is not None:
                held[linear][part] = tensor
                if len(held[linear]) == 3:
                    w = held.pop(linear)
                    yield f"{linear}.weight", merge_lora(w[""], w["A"], w["B"], self.scaling).to(w[""].dtype)
                continue
            if part == "B" and self.b_scale != 1.0:
                tensor = (tensor.float() * self.b_scale).to(tensor.dtype)
            yield name, tensor
            if linear in self.zero and part == "":
                yield f"{linear}.A.weight", tensor.new_zeros(self.lora_rank, tensor.shape[1])
                yield f"{linear}.B.weight", tensor.new_zeros(tensor.shape[0], self.lora_rank)


def upstream_config(config: XComposerConfig, dtype: torch.dtype, lora_rank: int) -> dict:
    """The upstream config.json of a model of ours (in its ExportView's form); v1 declares zero LoRA of `lora_rank`."""
    text = config.text_config
    common = dict(bos_token_id=text.bos_token_id, eos_token_id=2, hidden_act=text.hidden_act,
                  hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                  num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                  max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                  initializer_range=text.initializer_range, tie_word_embeddings=False,
                  torch_dtype=str(dtype).removeprefix("torch."), use_cache=True, vocab_size=text.vocab_size)
    if config.connector == "perceive_sampler":
        lora = dict(lora_r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.05, learn_param=["q", "v", "ffn"])
        return dict(architectures=["InternLMXComposerForCausalLM"], model_type="InternLMXComposer",
                    bias=text.attention_bias, kqvo_bias=text.attention_bias, pad_token_id=-1,
                    intern_converted_llm=True, num_query_token=config.qformer_config.num_query_tokens,
                    internlm_lora=lora, **common)
    return dict(architectures=["InternLMXComposer2ForCausalLM"], model_type="internlmxcomposer2",
                bias=text.attention_bias, pad_token_id=text.pad_token_id,
                num_key_value_heads=text.num_key_value_heads, max_length=4096, rope_theta=text.rope_theta,
                rope_scaling={"type": "dynamic", "factor": 1.0}, img_size=config.vision_config.image_size, **common)


def _check_faithful(config: XComposerConfig, version: int, upstream: dict, produced: dict, src: str):
    """An export is faithful only if converting it back describes the same model."""
    problem = None
    try:
        back = derive_config(version, upstream, {name: (shape, torch.float32) for name, shape in produced.items()})
    except ConversionError as err:
        problem = str(err)
    else:
        ours, theirs = _structure(config), _structure(back)
        problem = "\n  ".join(f"{k}: {ours[k]!r} here, {theirs.get(k)!r} in the upstream format"
                               for k in ours if ours[k] != theirs.get(k))
    if problem:
        raise ConversionError(f"{src} cannot be expressed in the upstream {NAMES[version]} format:\n  {problem}")


def export_upstream(src: str, dst: str, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE, force: bool = False,
                    lora_rank: int = 256) -> ConversionResult:
    """A folder of ours -> the upstream layout (config.json, pytorch_model-*.bin + index, tokenizer.model), for
    engines that read the original format. Converting the result back gives the same tensors bit for bit."""
    _check_destination(dst, force, src)
    cfg = _read_json(os.path.join(src, "config.json"))
    if detect_format(cfg) != "ours":
        raise ConversionError(f"{src} is not a folder of ours (model_type 'xcomposer')")
    try:
        config = XComposerConfig.from_dict({k: v for k, v in cfg.items() if k != "auto_map"})
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{src}/config.json: {err}") from None
    checkpoint = Checkpoint(src)
    identity = {_template(name)[0]: _template(name)[0] for name in checkpoint.specs}
    plan([(checkpoint, Rules(identity))], expected_shapes(config), where=src)
    view = ExportView(checkpoint, config, lora_rank)
    version = 1 if config.connector == "perceive_sampler" else 2
    dtype = _parse_dtype(dtype) or _source_dtype(cfg, checkpoint.specs)
    upstream = upstream_config(view.config, dtype, lora_rank)
    rules = upstream_rules(version, upstream, view.config).inverse()
    produced, _ = plan([(view, rules)], where=src)
    _check_faithful(view.config, version, upstream, produced, src)
    with staged_folder(dst, force) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size), fmt="bin")
        write_tensors([(view, rules)], writer, dtype, produced)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(upstream, f, indent=2)
        if os.path.isfile(os.path.join(src, "tokenizer.model")):
            shutil.copyfile(os.path.join(src, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
    return ConversionResult(str(dst), writer.num_tensors, writer.num_params, f"{NAMES[version]} (ours)", upstream,
                            layout="upstream")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert InternLM-XComposer (v1 / XComposer2) checkpoints to and from this repository's format.")
    parser.add_argument("src", nargs="?", help="the source folder (omit with --from-components)")
    parser.add_argument("dst", help="the folder to write (must not exist unless --force)")
    parser.add_argument("--to", choices=("ours", "upstream"), default="ours",
                        help="'ours' (default): upstream -> ours; 'upstream': ours -> the upstream layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 5GB or 500MB")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    components = parser.add_argument_group("a fresh model from raw component checkpoints")
    components.add_argument("--from-components", action="store_true")
    components.add_argument("--llm", metavar="DIR", help="InternLM2 (XComposer2) or InternLM (v1) HF folder")
    components.add_argument("--vision", metavar="DIR", help="transformers CLIPVisionModel folder (XComposer2)")
    components.add_argument("--eva", metavar="FILE", help="EVA ViT-g state dict, BLIP-2 key layout (v1)")
    components.add_argument("--qformer", metavar="FILE", help="BLIP-2 Q-Former state dict (v1)")
    components.add_argument("--img-size", type=int, help="image size (default: the vision tower's)")
    components.add_argument("--plora-rank", type=int, help="(Partial) LoRA rank (default 256 for v2, 0 for v1)")
    components.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation")
    parser.add_argument("--lora-rank", type=int, default=256,
                        help="--to upstream: rank of the zero LoRA matrices written where upstream expects them")
    return parser


def run(args) -> ConversionResult:
    if args.from_components:
        if args.src is not None or not args.llm:
            raise ConversionError("--from-components takes --llm (and --vision, or --eva and --qformer) and DST only")
        return convert_components(args.dst, args.llm, args.vision, args.eva, args.qformer, args.img_size,
                                  args.plora_rank, args.dtype, args.max_shard_size, args.force, args.seed)
    if args.src is None:
        raise ConversionError("give SRC and DST")
    if args.llm or args.vision or args.eva or args.qformer:
        raise ConversionError("--llm/--vision/--eva/--qformer need --from-components")
    if args.to == "upstream":
        return export_upstream(args.src, args.dst, args.dtype, args.max_shard_size, args.force, args.lora_rank)
    return convert_upstream(args.src, args.dst, args.dtype, args.max_shard_size, args.force)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ConversionError, OSError) as err:  # OSError: e.g. a full disk; DST is left untouched either way
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
