"""Writing complete model folders: the one writer that the converter, finetune.py, the tiny-synthetic recipe
and push_to_hub.py share. Not remote code: a downloaded model never runs this file.

A model loads from `model.save_pretrained` + `processor.save_pretrained` alone (transformers copies the
remote-code modules of every class it saves). What a published folder adds, and what only its writers
decide, lives here: the generation defaults, the model card, the staging that makes a folder appear only
when it is complete, and the check that a folder is complete before it is shared.
"""

import contextlib
import json
import os
import shutil
import tempfile

from transformers import GenerationConfig

from configuration_xcomposer import AUTO_MAP, HD_MERGE, XComposerConfig
from processing_xcomposer import XComposerImageProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
# The flat remote-code modules a folder needs beside its weights.
CODE_FILES = ("configuration_xcomposer.py", "modeling_xcomposer.py", "build_mlp.py", "tokenization_internlm.py",
              "processing_xcomposer.py", "transformers_compat.py")
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                "processor_config.json", "chat_template.jinja", "README.md", *CODE_FILES)

CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: {license}
{base_model}tags:
- internlm-xcomposer
- {generation_tag}
- vision-language
- multimodal
- custom_code
---

# {title}

{description}

| | |
| --- | --- |
| generation | {generation} |
| vision tower | {vision} |
| connector | {connector} |
| decoder | {decoder} |
| image tokens per image | {image_tokens} |
| parameters | {parameters} |

Loads with the Auto classes and `trust_remote_code=True`; the code is in this folder, and nothing is
downloaded at construction.

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

path = "{repo_id}"
# dtype=torch.bfloat16 halves the memory (spelled torch_dtype= before transformers 4.56)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
image = Image.open("example.jpg").convert("RGB")
response, history = model.chat(processor, "<ImageHere>Describe this picture.", images=image, max_new_tokens=32)
print(response)
```

`model.chat` decodes greedily by default; `processor(text=..., images=...)` and `model.generate` give
batched, left-padded generation. Each `<ImageHere>` in a prompt stands for one image.
"""


def copy_code_files(folder) -> None:
    """The remote-code modules of this checkout, so a folder written from scratch (the converter) loads."""
    for name in CODE_FILES:
        source, target = os.path.join(HERE, name), os.path.join(folder, name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)


def write_generation_config(folder, config: XComposerConfig) -> None:
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                     do_sample=False, max_new_tokens=1024).save_pretrained(folder)


def write_model_card(folder, config: XComposerConfig, repo_id: str | None = None, base_model: str | None = None,
                     title: str | None = None, description: str = "", license: str = "other",
                     parameters: int | None = None) -> None:
    v1, tiles = config.connector == "perceive_sampler", config.dynamic_tiles
    vision, text = config.vision_config, config.text_config
    card = CARD.format(
        license=license,
        base_model=f"base_model: {base_model}\n" if base_model else "",
        generation_tag="xcomposer" if v1 else "xcomposer2d5" if tiles else "xcomposer2",
        title=title or ("InternLM-XComposer" if v1 else "InternLM-XComposer-2.5" if tiles else "InternLM-XComposer2"),
        description=description or "A vision-language model in the InternLM-XComposer family.",
        generation="XComposer (2023)" if v1 else "XComposer-2.5 / 4KHD (2024), high-resolution tiles" if tiles else
                   "XComposer2 (2024)",
        vision=f"{'EVA-CLIP' if vision.variant == 'eva' else 'CLIP'} ViT, {vision.num_hidden_layers} layers, "
               f"width {vision.hidden_size}, {vision.image_size} px{' tiles' if tiles else ''}, "
               f"patch {vision.patch_size}",
        connector=(f"perceive sampler: {config.qformer_config.num_query_tokens} queries, "
                   f"{config.qformer_config.num_hidden_layers} Q-Former layers") if v1 else
                  (f"global view + up to {config.hd_num} tiles, 2x2 merge, row separators, MLP projector" if tiles
                   else "MLP projector (mlp2x_gelu)"),
        decoder=(f"{'InternLM' if v1 else 'InternLM2'}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
                 f"{text.num_attention_heads}/{text.num_key_value_heads} heads"
                 + (f", Partial LoRA rank {text.lora_rank}" if text.lora_rank and text.lora_scope == "image" else "")),
        image_tokens=_image_tokens(config),
        parameters=f"{parameters:,}" if parameters else "see the weights",
        repo_id=repo_id or ".",
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def _image_tokens(config: XComposerConfig) -> str:
    if not config.dynamic_tiles:
        return str(config.num_image_tokens)
    g = config.vision_config.image_size // config.vision_config.patch_size // HD_MERGE
    return (f"(rows x cols + 1) x {g * g} + 1 + (rows + 1) x {g} for a grid of rows x cols tiles "
            f"(one tile: {config.hd_num_image_tokens(1, 1)})")


def write_folder_files(folder, config: XComposerConfig, processor=None, **card) -> None:
    """Everything but the weights: config and code, generation config, processor, tokenizer and chat template,
    model card (`card` holds write_model_card's keywords). Without a processor (a source with no tokenizer),
    the image processor alone."""
    with without_trainer_use_cache(config):
        config.save_pretrained(folder)
    write_generation_config(folder, config)
    if processor is not None:
        processor.save_pretrained(folder)
    else:  # a source without a tokenizer: the image processor alone
        XComposerImageProcessor.for_model(config).save_pretrained(folder)
    copy_code_files(folder)  # last: the saves above copy the modules their classes came from
    write_model_card(folder, config, **card)


@contextlib.contextmanager
def staged_folder(dst, replace: bool = False):
    """Yields a temporary folder beside `dst` that becomes `dst` only if the block completes; on any failure
    (Ctrl-C included) it is removed and a previous `dst` is left as it was. An existing `dst` is replaced only
    with `replace`, else FileExistsError."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not replace:
        raise FileExistsError(f"{dst} already exists")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=parent)
    old = None
    try:
        yield tmp
        _apply_umask(tmp)
        if os.path.lexists(dst):
            old = tmp + ".old"
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException:
        if old is not None and not os.path.lexists(dst):
            os.replace(old, dst)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def _apply_umask(folder) -> None:
    """The modes a user's files get: mkdtemp makes the folder 0700, safetensors its files 0600, and some
    transformers releases copy code files with the checkout's own modes."""
    umask = os.umask(0)
    os.umask(umask)
    for root, folders, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_model_folder(model, processor, folder, replace: bool = True, **card) -> None:
    """A complete folder from a model in memory (finetune.py, the recipe): safetensors weights, config and code,
    processor, tokenizer, chat template, generation config and model card, staged so that it appears complete
    or not at all."""
    card.setdefault("parameters", sum(p.numel() for p in model.parameters()))
    with staged_folder(folder, replace=replace) as tmp:
        model.save_pretrained(tmp)
        write_folder_files(tmp, model.config, processor, **card)


@contextlib.contextmanager
def without_trainer_use_cache(config):
    """Trainer (5.x) sets a top-level `use_cache=False` on the model's config for training. The decoder's own
    switch is `text_config.use_cache`, so that training-time value is kept out of a saved config.json, where
    readers would take it for an uncached model."""
    value = config.__dict__.pop("use_cache", None)
    try:
        yield
    finally:
        if value is not None:
            config.use_cache = value


def check_model_folder(folder) -> list[str]:
    """Problems that would stop the folder from loading elsewhere, or from being shared; empty when complete."""
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    problems = [f"missing {name}" for name in FOLDER_FILES if not os.path.isfile(os.path.join(folder, name))]
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map", {})
            missing = sorted(set(AUTO_MAP) - set(auto_map))
            if missing:
                problems.append(f"config.json auto_map lacks {missing}")
        except json.JSONDecodeError as error:
            problems.append(f"config.json is not valid JSON: {error}")
    problems += _check_weights(folder)
    return problems


def _check_weights(folder) -> list[str]:
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        if not shards:
            return ["model.safetensors.index.json names no weights"]
        return [f"the weight index names {name}, which is missing" for name in shards
                if not os.path.isfile(os.path.join(folder, name))]
    if os.path.isfile(single):
        return []
    return ["no weights: neither model.safetensors nor model.safetensors.index.json"]
