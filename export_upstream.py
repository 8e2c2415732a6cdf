"""A folder of ours -> the upstream XComposer v1 / XComposer2 layout (config.json, pytorch_model-*.bin shards
with their index, tokenizer.model), for engines that read the original format.

    python convert_checkpoint.py --to upstream SRC DST [--lora-rank 256]

The export runs convert_upstream's key tables backwards. The inverse of each layout fix lives here: fused
q/k/v are split again, InternLM2's wqkv goes back to its per-KV-group order, CLIP's tables lose their batch
dimension, and where upstream code expects LoRA matrices that our model does not have, zero ones of
`lora_rank` are written. Our own adapters are made expressible first (`ExportView`): plain LoRA is merged into
its linears, a Partial-LoRA scaling is folded into B. The export is planned on the meta device and converted
back before anything is written, and goes ahead only if the upstream format describes the same model;
converting its result back gives the same tensors bit for bit.
"""

import copy
import json
import os
import shutil
from collections import defaultdict

import torch

from checkpoint_io import (DEFAULT_SHARD_SIZE, Checkpoint, ConversionError, ConversionResult, Rules, ShapesOnly,
                           ShardWriter, check_destination, output_folder, parse_dtype, parse_size, plan, planned_bytes,
                           progress_bar, read_json, source_dtype, template, write_tensors)
from configuration_xcomposer import LORA_TARGETS, XComposerConfig
from convert_upstream import (LM, PS, VT, count_layers, derive_config, detect_format, expected_shapes, fold_lora,
                              source_name, upstream_rules)


def groups_from_qkv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[Q; K; V] rows -> InternLM2's per-KV-group packing (the inverse of convert_upstream.qkv_from_groups)."""
    per, rest = num_heads // num_kv_heads, w.shape[1:]
    head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = w.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
    groups = torch.cat([q.reshape(num_kv_heads, per, head_dim, *rest), k.reshape(num_kv_heads, 1, head_dim, *rest),
                        v.reshape(num_kv_heads, 1, head_dim, *rest)], dim=1)
    return groups.reshape(-1, *rest)


# --------------------------------------------------------------------------- the key tables, backwards


def layout_inverses(config: XComposerConfig) -> dict:
    """Our target template -> the function that undoes its layout fix (before fused parts are split)."""
    if config.connector != "mlp2x_gelu":
        return {}  # EVA's tensors keep their layout; v1's fixes only fuse and fold
    text = config.text_config

    def ungroup(t):
        return groups_from_qkv(t, text.num_attention_heads, text.num_key_value_heads)
    return {f"{VT}embeddings.cls_token": lambda t: t.reshape(-1), f"{VT}embeddings.pos_embed": lambda t: t.squeeze(0),
            **{f"{LM}layers.{{}}.attention.wqkv.{s}": ungroup for s in ("weight", "bias", "B.weight")}}


def _lora_owner(part: str):
    """'q.A' -> ('q', 'A'), 'B' -> ('', 'B'), 'q' -> None: which part a LoRA part belongs to."""
    owner, _, last = part.rpartition(".")
    return (owner, last) if last in ("A", "B") else None


def _splitter(parts: dict, undo, lora_rank: int):
    """Our tensor -> {upstream template: tensor}: the layout undone, fused parts split evenly, and zero LoRA
    matrices of `lora_rank` for the parts upstream expects beside them."""
    base = [p for p in parts if _lora_owner(p) is None]

    def split(p):
        tensor = undo(p[""]) if undo else p[""]
        pieces = dict(zip(base, tensor.chunk(len(base)))) if len(base) > 1 else {base[0]: tensor}
        out = {}
        for part, source in parts.items():
            lora = _lora_owner(part)
            if lora is None:
                out[source] = pieces[part]
                continue
            owner = pieces[lora[0]]
            shape = (lora_rank, owner.shape[1]) if lora[1] == "A" else (owner.shape[0], lora_rank)
            out[source] = owner.new_zeros(shape)
        return out
    return split


def inverse_rules(rules: Rules, config: XComposerConfig, lora_rank: int) -> Rules:
    """Our names -> upstream names: a rename where a target is one upstream tensor as it is, else a split."""
    undo, table, fixes = layout_inverses(config), {}, {}
    for target, parts in rules.parts.items():
        if list(parts) == [""] and target not in undo:
            table[target] = parts[""]
        else:
            table[target] = target
            fixes[target] = _splitter(parts, undo.get(target), lora_rank)
    return Rules(table, fixes)


# --------------------------------------------------------------------------- what the upstream format can hold


def _linear_part(name: str):
    """'x.wqkv.weight' -> ('x.wqkv', ''), 'x.wqkv.A.weight' -> ('x.wqkv', 'A'); anything else -> (name, None)."""
    if name.endswith((".A.weight", ".B.weight")):
        return name[: -len(".A.weight")], name[-len("A.weight")]
    if name.endswith(".weight"):
        return name[: -len(".weight")], ""
    return name, None


def _decoder_linears(names, targets) -> set:
    """Our decoder linears among `names` whose own name is one of `targets` (e.g. ...layers.0.attention.wqkv)."""
    linears = {_linear_part(n)[0] for n in names if n.startswith(f"{LM}layers.") and _linear_part(n)[1] == ""}
    return {linear for linear in linears if linear.rsplit(".", 1)[-1] in targets}


class ExportView:
    """Our checkpoint as the upstream format can hold it: plain LoRA merged into its linears; XComposer2 keeps
    Partial LoRA with scaling 1 (alpha folded into B) or gets zero adapters of `lora_rank` when it has none.
    `config` is the model it then describes."""

    def __init__(self, checkpoint, config: XComposerConfig, lora_rank: int):
        self.path, self.checkpoint, self.lora_rank = checkpoint.path, checkpoint, lora_rank
        text = config.text_config
        self.config = copy.deepcopy(config)
        canonical = self.config.text_config
        adapted = _decoder_linears(checkpoint.specs, text.lora_targets) if text.lora_rank else set()
        self.merge, self.zero, self.scaling, self.b_scale = set(), set(), 1.0, 1.0
        if text.lora_scope == "all" and text.lora_rank:
            self.merge, self.scaling, canonical.lora_rank = adapted, text.lora_alpha / text.lora_rank, 0
        elif text.lora_rank and config.connector == "perceive_sampler":
            raise ConversionError("XComposer v1 cannot hold Partial LoRA (lora_scope 'image'), and it cannot be merged")
        if config.connector != "perceive_sampler":
            if canonical.lora_rank and sorted(text.lora_targets) != sorted(LORA_TARGETS):
                raise ConversionError(f"XComposer2 has Partial LoRA on all of {list(LORA_TARGETS)}, this model only "
                                      f"on {text.lora_targets}")
            if canonical.lora_rank:
                self.b_scale = text.lora_alpha / text.lora_rank  # upstream fixes the scaling to 1
            else:
                self.zero = _decoder_linears(checkpoint.specs, LORA_TARGETS)
                canonical.lora_rank = lora_rank
            canonical.lora_alpha, canonical.lora_scope = float(canonical.lora_rank), "image"
            canonical.lora_targets = list(LORA_TARGETS)
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
                    yield f"{linear}.weight", fold_lora(w[""], w["A"], w["B"], self.scaling).to(w[""].dtype)
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
    if config.dynamic_tiles:  # XComposer-2.5 / 4KHD: the tile size lives in the position table alone
        factor = text.rope_dynamic_factor
        return dict(architectures=["InternLMXComposer2ForCausalLM"], model_type="internlmxcomposer2",
                    bias=text.attention_bias, pad_token_id=text.pad_token_id,
                    num_key_value_heads=text.num_key_value_heads, max_length=16384, rope_theta=text.rope_theta,
                    rope_scaling=None if factor is None else {"type": "dynamic", "factor": factor}, **common)
    return dict(architectures=["InternLMXComposer2ForCausalLM"], model_type="internlmxcomposer2",
                bias=text.attention_bias, pad_token_id=text.pad_token_id,
                num_key_value_heads=text.num_key_value_heads, max_length=4096, rope_theta=text.rope_theta,
                rope_scaling={"type": "dynamic", "factor": 1.0}, img_size=config.vision_config.image_size, **common)


def structure(config: XComposerConfig) -> dict:
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
    if config.dynamic_tiles:
        out |= {"tiles": True, "text_config.rope_dynamic_factor": text.rope_dynamic_factor}
    if config.qformer_config is not None:
        qformer = config.qformer_config.to_dict()
        out |= {f"qformer_config.{k}": qformer[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "hidden_act", "layer_norm_eps",
                                                           "cross_attention_frequency", "encoder_hidden_size",
                                                           "num_query_tokens")}
    return out


def _check_faithful(config: XComposerConfig, upstream: dict, produced: dict, src: str):
    """An export is faithful only if converting it back describes the same model."""
    problem = None
    try:
        back = derive_config(upstream, produced)
    except ConversionError as err:
        problem = str(err)
    else:
        ours, theirs = structure(config), structure(back)
        problem = "\n  ".join(f"{k}: {ours[k]!r} here, {theirs.get(k)!r} in the upstream format"
                               for k in ours if ours[k] != theirs.get(k))
    if problem:
        raise ConversionError(f"{src} cannot be expressed in the upstream {source_name(config)} "
                              f"format:\n  {problem}")


def _plan_export(checkpoint, config: XComposerConfig, lora_rank: int, dtype: torch.dtype, where: str):
    view = ExportView(checkpoint, config, lora_rank)
    upstream = upstream_config(view.config, dtype, lora_rank)
    rules = inverse_rules(upstream_rules(upstream, view.config), view.config, lora_rank)
    produced, _ = plan([(view, rules)], where=where)
    _check_faithful(view.config, upstream, produced, where)
    return view, rules, upstream, produced


def dry_run(config: XComposerConfig, lora_rank: int = 256, dtype=torch.bfloat16):
    """An export planned at any size without tensors (nothing is allocated): the upstream config.json and
    {upstream name: shape} that exporting a model with this configuration writes."""
    _, _, upstream, produced = _plan_export(ShapesOnly(expected_shapes(config), dtype, "the model"), config,
                                            lora_rank, dtype, "the model")
    return upstream, produced


# --------------------------------------------------------------------------- the export


def _our_config(src: str, cfg: dict, shapes: dict) -> XComposerConfig:
    """Our config.json, its layer counts checked against the tensors before a model is built from it."""
    try:
        config = XComposerConfig.from_dict({k: v for k, v in cfg.items() if k != "auto_map"})
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConversionError(f"{src}/config.json: {err}") from None
    for key, prefix in (("text_config", f"{LM}layers."), ("vision_config", f"{VT}blocks."),
                        ("qformer_config", f"{PS}layers.")):
        sub = getattr(config, key)
        if sub is not None and sub.num_hidden_layers != count_layers(shapes, prefix):
            raise ConversionError(f"{src}/config.json: {key}.num_hidden_layers is {sub.num_hidden_layers}, but the "
                                  f"tensors hold {count_layers(shapes, prefix)} layers", [f"{key}.num_hidden_layers"])
    return config


def export_upstream(src, dst, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE, force: bool = False,
                    lora_rank: int = 256, quiet: bool = False) -> ConversionResult:
    """A folder of ours -> the upstream layout. Converting the result back gives the same tensors bit for bit."""
    src, dst = str(src), str(dst)
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ConversionError(f"--lora-rank must be a positive integer, got {lora_rank!r}", ["--lora-rank"])
    check_destination(dst, force, src)
    cfg = read_json(os.path.join(src, "config.json"))
    if detect_format(cfg) != "ours":
        raise ConversionError(f"{src} is not a folder of ours (model_type 'xcomposer')")
    tokenizer = os.path.join(src, "tokenizer.model")
    if os.path.lexists(tokenizer) and not os.path.isfile(tokenizer):
        raise ConversionError(f"{tokenizer} is not a regular file", [tokenizer])
    checkpoint = Checkpoint(src)
    config = _our_config(src, cfg, checkpoint.shapes)
    identity = {template(name)[0]: template(name)[0] for name in checkpoint.specs}
    plan([(checkpoint, Rules(identity))], expected_shapes(config), where=src)
    dtype = parse_dtype(dtype) or source_dtype(cfg, checkpoint.specs)
    view, rules, upstream, produced = _plan_export(checkpoint, config, lora_rank, dtype, src)
    max_bytes = parse_size(max_shard_size)
    with output_folder(dst, force) as tmp, progress_bar(planned_bytes(produced, dtype), f"writing {dst}", quiet) as bar:
        writer = ShardWriter(tmp, max_bytes, fmt="bin", progress=bar)
        write_tensors([(view, rules)], writer, dtype, produced)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(upstream, f, indent=2)
        if os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
    return ConversionResult(dst, writer.num_tensors, writer.num_params,
                            f"{source_name(config)} (ours)", upstream, layout="upstream")
