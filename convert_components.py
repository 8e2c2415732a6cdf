"""A fresh, untrained model of ours from raw component checkpoints.

    python convert_checkpoint.py --from-components --llm DIR --vision DIR [--img-size 490] DST   # XComposer2
    python convert_checkpoint.py --from-components --llm DIR --eva FILE --qformer FILE DST        # XComposer v1

The LLM is an InternLM2 or InternLM folder in the HF layout, the vision tower a transformers CLIPVisionModel
folder (v2) or an EVA ViT-g and a BLIP-2 Q-Former state dict (v1). Their tensors go through the same key
tables as upstream checkpoints (convert_upstream.py); what no component holds (the projector or the
perceive sampler's projection and flags, the (Partial) LoRA) starts from our model's own initialisation.
Every size a component's config.json states is checked against its tensors before a model is built.
"""

import copy
import os

import torch
from transformers import CLIPVisionConfig, PreTrainedModel

from checkpoint_io import (DEFAULT_SHARD_SIZE, Checkpoint, ConversionError, ConversionResult, Rules, ShardWriter,
                           check_destination, key_table, output_folder, parse_dtype, parse_size, plan, planned_bytes,
                           progress_bar, read_json, source_dtype, write_tensors)
from configuration_xcomposer import LORA_TARGETS, XComposerConfig
from convert_upstream import (PS, VT, check_activation, check_image_size, clip_fixes, clip_sizes, clip_table,
                              eva_fixes, eva_sizes, eva_table, expected_shapes, internlm2_fixes, internlm2_table,
                              internlm_fixes, internlm_table, ln_vision_table, load_tokenizer, make_config,
                              preset_text, qformer_sizes, qformer_table, text_config_from, write_model_files)
from modeling_xcomposer import XComposerForCausalLM

BLIP2_UNUSED = """                                          # BLIP-2's text branch: present, unused by XComposer
embeddings.word_embeddings.weight        -
embeddings.position_embeddings.weight    -
encoder.layer.{}.intermediate.dense.*    -
encoder.layer.{}.output.dense.*          -
encoder.layer.{}.output.LayerNorm.*      -
"""
BLIP2_IGNORED = ("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.", "temp")
CLIP_MODEL_IGNORED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# The sizes of a transformers CLIP config.json that its tensors also fix.
CLIP_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size")
# Parameters that may start from our initialisation, per connector (the LoRA matrices in both).
FRESH = {"mlp2x_gelu": ["model.vision_proj.*"],
         "perceive_sampler": [f"{PS}internlm_proj.*", f"{PS}flag_image_*", f"{VT}post_norm.*"]}


def _llm_type(cfg: dict) -> str:
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in ("internlm2", "internlm"):
        return model_type
    raise ConversionError(f"--llm: expected an InternLM2 or InternLM checkpoint, got model_type {model_type!r}")


def _llm_rules(llm_type: str, text: dict) -> Rules:
    if llm_type == "internlm2":
        return Rules(internlm2_table(plora=False),
                     internlm2_fixes(text["num_attention_heads"], text["num_key_value_heads"]))
    table = internlm_table("")
    return Rules(table, internlm_fixes(table))


def _clip_prefix(shapes: dict, path: str) -> str:
    """'' for transformers 5's CLIPVisionModel files, 'vision_model.' for older ones and for CLIPModel."""
    for name in shapes:
        if name.endswith("embeddings.patch_embedding.weight") and not name.startswith("text_model."):
            return name[: -len("embeddings.patch_embedding.weight")]
    raise ConversionError(f"{path}: no CLIP patch embedding found", [path])


def _clip_config(path: str, shapes: dict, prefix: str, img_size) -> dict:
    """Our vision_config of a transformers CLIP folder: sizes from the tensors, each size its config.json states
    checked against them; heads, activation and eps from config.json (CLIPVisionConfig's defaults)."""
    where = f"{path}/config.json"
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
        if not isinstance(cfg, dict):
            raise ConversionError(f"{where}: vision_config must be an object", ["vision_config"])
    elif cfg.get("model_type") != "clip_vision_model":
        raise ConversionError(f"--vision: expected a CLIPVisionModel folder, got model_type {cfg.get('model_type')!r}")
    vision = clip_sizes(shapes, prefix)
    for key in CLIP_SIZES:
        if key in cfg and cfg[key] != vision[key]:
            raise ConversionError(f"{where}: {key} is {cfg[key]!r}, but the tensors hold {vision[key]}", [key])
    if "image_size" in cfg:
        check_image_size(cfg["image_size"], vision, where, "image_size")
    defaults = CLIPVisionConfig().to_dict()
    vision |= {k: cfg.get(k, defaults[k]) for k in ("num_attention_heads", "hidden_act", "layer_norm_eps")}
    check_activation(vision["hidden_act"], where)
    if img_size is not None:  # a resize the user asks for: the position table is interpolated
        vision["image_size"] = img_size
    return vision


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
                    model._init_weights(module)  # transformers' per-module init hook, as from_pretrained calls it
    state = model.state_dict()
    return {name: state[name].detach() for name in names}


def _check_img_size(img_size):
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0):
        raise ConversionError(f"--img-size must be a positive integer, got {img_size!r}", ["--img-size"])


def convert_components(dst, llm, vision=None, eva=None, qformer=None, img_size: int | None = None,
                       lora_rank: int | None = None, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE,
                       force: bool = False, seed: int = 0, quiet: bool = False) -> ConversionResult:
    """A fresh, untrained model: an InternLM2/InternLM LLM plus a CLIP vision tower (v2) or EVA ViT-g and BLIP-2
    Q-Former state dicts (v1). The connector and the (Partial) LoRA of `lora_rank` (default 256 for v2, none
    for v1) start from our model's init."""
    if bool(vision) == bool(eva or qformer) or (not vision and not (eva and qformer)):
        raise ConversionError("give --vision (XComposer2), or --eva and --qformer (XComposer v1)")
    _check_img_size(img_size)
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0):
        raise ConversionError(f"--lora-rank must be an integer >= 0, got {lora_rank!r}", ["--lora-rank"])
    dst = str(dst)
    check_destination(dst, force, *(str(p) for p in (llm, vision, eva, qformer) if p))
    llm_cfg = read_json(os.path.join(llm, "config.json"))
    llm_type = _llm_type(llm_cfg)
    llm_checkpoint = Checkpoint(llm)
    text = text_config_from(llm_cfg, llm_checkpoint.shapes, llm_type, rope_theta_default=1e4,
                            where=f"{llm}/config.json")
    sources = [(llm_checkpoint, _llm_rules(llm_type, text))]
    if vision:
        rank = 256 if lora_rank is None else lora_rank
        text |= dict(lora_rank=rank, lora_alpha=float(rank), lora_scope="image", lora_targets=list(LORA_TARGETS))
        checkpoint = Checkpoint(vision)
        prefix = _clip_prefix(checkpoint.shapes, vision)
        config = make_config(connector="mlp2x_gelu", vision_config=_clip_config(vision, checkpoint.shapes, prefix,
                                                                                img_size), text_config=text)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        sources.append((checkpoint, Rules(clip_table(prefix), clip_fixes(grid), ignore=CLIP_MODEL_IGNORED)))
        source_name = f"components ({llm_type.upper()} + CLIP)"
    else:
        eva_checkpoint, qformer_checkpoint = Checkpoint(eva), Checkpoint(qformer)
        eva_prefix = "visual_encoder." if any(n.startswith("visual_encoder.") for n in eva_checkpoint.specs) else ""
        eva_config = eva_sizes(eva_checkpoint.shapes, eva_prefix)
        eva_config["image_size"] = img_size or eva_config["image_size"]
        if lora_rank:
            v1 = preset_text("perceive_sampler")
            text |= dict(lora_rank=lora_rank, lora_alpha=float(lora_rank), lora_scope=v1.lora_scope,
                         lora_targets=list(v1.lora_targets))
        config = make_config(connector="perceive_sampler", vision_config=eva_config,
                             qformer_config=qformer_sizes(qformer_checkpoint.shapes), text_config=text)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        sources += [(eva_checkpoint, Rules({**eva_table(eva_prefix), **ln_vision_table()}, eva_fixes(grid))),
                    (qformer_checkpoint, Rules({**qformer_table(), **ln_vision_table(),
                                                **key_table(BLIP2_UNUSED, "Qformer.bert.")}, ignore=BLIP2_IGNORED))]
        source_name = f"components ({llm_type.upper()} + EVA + Q-Former)"
    tokenizer = load_tokenizer(llm, config)
    dtype = parse_dtype(dtype) or source_dtype(llm_cfg, llm_checkpoint.specs)
    fresh_ok = ["*.A.weight", "*.B.weight", *FRESH[config.connector]]
    expected = expected_shapes(config)
    planned, fresh = plan(sources, expected, fresh_ok, where="the components")
    planned |= {name: expected[name] for name in fresh}
    max_bytes = parse_size(max_shard_size)
    with output_folder(dst, force) as tmp, progress_bar(planned_bytes(planned, dtype), f"writing {dst}", quiet) as bar:
        writer = ShardWriter(tmp, max_bytes, progress=bar)
        write_tensors(sources, writer, dtype, planned, extra=fresh_parameters(config, fresh, seed))
        write_model_files(tmp, config, tokenizer, dtype)
    return ConversionResult(dst, writer.num_tensors, writer.num_params, source_name, config)
