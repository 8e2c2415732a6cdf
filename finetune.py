"""Fine-tune InternLM-XComposer (v1) or XComposer2 with the Hugging Face Trainer.

    python finetune.py --model_name_or_path MODEL --data_path train.jsonl --output_dir OUT [TrainingArguments...]
    python finetune.py --model_name_or_path MODEL --merge_lora ADAPTER_DIR --output_dir MERGED
    python finetune.py --recipe tiny-synthetic --output_dir DIR   # train a small XComposer2 from scratch

Every TrainingArguments flag works (bf16, gradient accumulation, activation checkpointing, resume,
DDP/FSDP/DeepSpeed through accelerate or torchrun).

Data: a JSON list or JSONL file(s) of conversations. Upstream's format
    {"id": ..., "image": [paths], "conversations": [{"from": "user", "value": "<ImageHere>..."}, {"from": "assistant", ...}]}
or the role/content form {"id": ..., "images": [...], "messages": [{"role": ..., "content": ...}]}.
One `<ImageHere>` per image, several images per sample, text-only samples mixed in; a sample with images but
no placeholder gets them in front of its first user turn. Only assistant answers are trained, including the
end-of-turn piece that ends them, so the model learns to stop.
"""

import functools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__":
    # Shared CPUs: with OpenMP's default spin-waiting, 2 threads on 2 busy cores ran 10-30x slower than 1
    # (measured 2-6 s vs 0.2 s per step); passive waiting keeps the second thread a gain. Set before torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from configuration_xcomposer import XComposerConfig
from model_folder import save_model_folder, write_folder_files
from modeling_xcomposer import XComposerForCausalLM
from processing_xcomposer import END_OF_TURN, IMAGE_PLACEHOLDER, XComposerProcessor, load_image
from tokenization_internlm import InternLMTokenizer
from training_recipes import (
    RecipeArguments,
    RecipeTrainer,
    apply_freezing,
    concat_sources,
    load_model_for_recipe,
    recipe_from_args,
    set_image_size,
)

IGNORE_INDEX = -100
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "system": "system"}
# Decoder linears only: never the vision tower, and never PartialLoRALinear's own A/B adapters.
DEFAULT_LORA_TARGETS = r"(.*\.)?language_model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))"
NON_LORA_FILE = "non_lora_trainables.safetensors"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "model folder to fine-tune"})
    # None: the --stage preset's choice, or without a stage the default named in the help.
    train_vision_tower: bool | None = field(default=None, metadata={"help": "train the ViT (default False)"})
    train_connector: bool | None = field(default=None, metadata={"help": "train vision_proj (v2) / "
                                                                         "perceive_sampler (v1) (default True)"})
    train_llm: bool | None = field(default=None, metadata={"help": "train the decoder's own weights (default "
                                                                   "True, False with --use_lora)"})
    train_plora: bool | None = field(default=None, metadata={"help": "train the (Partial) LoRA A/B adapters "
                                                                     "(default True)"})
    use_lora: bool = field(default=False, metadata={"help": "PEFT LoRA on the decoder linears"})
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names"})
    merge_lora: str | None = field(default=None, metadata={"help": "adapter folder: merge into the base model, "
                                                                    "write a complete model to --output_dir"})
    recipe: str | None = field(default=None, metadata={"help": "'tiny-synthetic': train a small XComposer2 "
                                                               "from scratch on synthetic shapes"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "JSON/JSONL file(s), comma separated"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths "
                                                                     "(default: the data file's folder)"})
    max_length: int = 4096
    system: str | None = field(default=None, metadata={"help": "system prompt ('' for none; default: the "
                                                               "chat template's)"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip bad samples (and count them) "
                                                                    "instead of failing"})


# --------------------------------------------------------------------------- data


class BadSample(ValueError):
    pass


def normalize_record(record: dict, index: int) -> tuple[str, list[dict], list]:
    """Either data form -> (name, messages [{"role", "content"}], images). `name` is the id or the index."""
    name = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    if not isinstance(record, dict):
        raise BadSample(f"sample {name}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not turns:
        raise BadSample(f"sample {name}: empty conversation")
    messages = []
    for turn in turns:
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise BadSample(f"sample {name}: a turn needs a role (user/assistant/system) and a text, got {turn!r}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadSample(f"sample {name}: empty conversation (no assistant answer to train on)")
    images = record.get("image", record.get("images")) or []
    images = images if isinstance(images, (list, tuple)) else [images]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and not placeholders:  # images without placeholders go in front of the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample(f"sample {name}: has images but no user turn")
        first_user["content"] = IMAGE_PLACEHOLDER * len(images) + first_user["content"]
    elif placeholders != len(images):
        more = "more" if placeholders > len(images) else "fewer"
        raise BadSample(f"sample {name}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} "
                        f"images ({more} placeholders than images)")
    return name, messages, list(images)


class ChatEncoder:
    """Renders messages with the processor's chat template (the one model.chat uses) and tokenizes them into
    input_ids and labels: only assistant answers up to and including their end-of-turn piece are trained."""

    def __init__(self, processor, system: str | None = None):
        self.processor, self.system = processor, system
        self.end_piece = processor.end_of_turn
        self._encode = functools.lru_cache(maxsize=65536)(self._encode_uncached)

    def __call__(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        if self.system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        return self._encode(tuple((m["role"], m["content"]) for m in messages))

    def _render(self, messages, generation_prompt=False) -> str:
        return self.processor.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                  add_generation_prompt=generation_prompt, tokenize=False)

    def _encode_uncached(self, messages: tuple) -> tuple[list[int], list[int]]:
        full = self._render(messages)
        pieces, start = [], 0  # (text, trained)
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            prompt, turn = self._render(messages[:i], True), self._render(messages[: i + 1])
            if not (full.startswith(turn) and turn.startswith(prompt) and len(prompt) >= start):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            answer = turn[len(prompt):]
            cut = answer.rfind(self.end_piece)
            end = len(prompt) + (cut + len(self.end_piece) if cut >= 0 else len(answer))
            pieces += [(full[start:len(prompt)], False), (full[len(prompt):end], True)]
            start = end
        if full[start:].strip():
            pieces.append((full[start:], False))
        input_ids, labels = [], []
        for j, (text, trained) in enumerate(pieces):
            # Tokenized as the processor does (and model.chat does for the prompt): BOS once, images expanded.
            ids = self.processor.encode_prompt(text, add_special_tokens=j == 0)
            input_ids += ids
            labels += [t if trained and t != self.processor.image_token_id else IGNORE_INDEX for t in ids]
        return input_ids, labels


class ConversationDataset(torch.utils.data.Dataset):
    """Validates every sample up front (clear errors naming the sample, or skipped and counted with
    `skip_bad_samples`); images are read lazily in __getitem__."""

    def __init__(self, records, encoder: ChatEncoder, max_length: int, image_folder: str | None = None,
                 skip_bad_samples: bool = False, log=print):
        self.records, self.encoder, self.image_folder = records, encoder, image_folder
        self.keep, self.skipped, self.num_text_only = [], 0, 0
        for index in range(len(records)):
            try:
                name, messages, images = normalize_record(records[index], index)
                for image in images:
                    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(self._path(image)):
                        raise BadSample(f"sample {name}: image file not found: {self._path(image)}")
                input_ids, _ = encoder(messages)
                if len(input_ids) > max_length:
                    raise BadSample(f"sample {name}: {len(input_ids)} tokens, longer than max_length={max_length}")
            except BadSample as err:
                if not skip_bad_samples:
                    raise
                self.skipped += 1
                if self.skipped <= 10:
                    log(f"skipping bad sample: {err}")
                continue
            self.keep.append(index)
            self.num_text_only += not images
        if self.skipped:
            log(f"skipped {self.skipped} bad samples of {len(records)} (--skip_bad_samples)")
        if not self.keep:
            raise ValueError("no usable training samples")

    def _path(self, image):
        return image if self.image_folder is None else os.path.join(self.image_folder, image)

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, i) -> dict:
        index = self.keep[i]
        name, messages, images = normalize_record(self.records[index], index)
        input_ids, labels = self.encoder(messages)
        pixel_values = None
        if images:
            # a path (relative to image_folder), a PIL image or array, or a callable drawing one lazily
            images = [self._path(im) if isinstance(im, (str, os.PathLike)) else im() if callable(im) else im
                      for im in images]
            try:
                pixel_values = self.encoder.processor.image_processor([load_image(im) for im in images])["pixel_values"]
            except ValueError as err:
                raise BadSample(f"sample {name}: {err}") from err
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


@dataclass
class DataCollator:
    """Right-pads input_ids (pad id), labels (-100) and the attention mask; concatenates the batch's images
    in order. A text-only batch has no pixel_values."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(f["input_ids"])
            batch["labels"][row, :n] = torch.as_tensor(f["labels"])
            batch["attention_mask"][row, :n] = 1
        pixels = [f["pixel_values"] for f in features if f["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


def load_records(data_path: str) -> list:
    records = []
    for path in data_path.split(","):
        with open(path) as f:
            text = f.read()
        if path.endswith(".jsonl"):
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records += data if isinstance(data, list) else [data]
    return records


# --------------------------------------------------------------------------- what trains


def is_plora(name: str) -> bool:
    return re.search(r"\.(A|B)\.weight$", name) is not None


def set_trainable(model, train_vision_tower=False, train_connector=True, train_llm=True, train_plora=True) -> None:
    """Freeze or train the vision tower, the connector, the decoder (incl. embeddings and LM head) and the
    Partial LoRA adapters separately. v1's image start/end flags stay frozen, as upstream."""
    frozen_flags = {"model.perceive_sampler.flag_image_start", "model.perceive_sampler.flag_image_end"}
    for name, param in model.named_parameters():
        if name in frozen_flags:
            param.requires_grad_(False)
        elif name.startswith("model.vision_tower."):
            param.requires_grad_(train_vision_tower)
        elif name.startswith(("model.vision_proj.", "model.perceive_sampler.")):
            param.requires_grad_(train_connector)
        elif is_plora(name):
            param.requires_grad_(train_plora)
        else:  # decoder, embeddings, LM head
            param.requires_grad_(train_llm)


def acts_on_images_only(model, name: str) -> bool:
    """The vision tower, the connector and Partial LoRA see image tokens only (PEFT's prefix ignored)."""
    name = name.split("base_model.model.")[-1]
    return name.startswith(("model.vision_tower.", "model.vision_proj.", "model.perceive_sampler.")) or (
        model.config.text_config.lora_scope == "image" and is_plora(name))


def image_only_parameters_trainable(model) -> bool:
    """True when a text-only batch would leave trainable parameters without gradients: DDP must then look
    for unused parameters."""
    return any(p.requires_grad and acts_on_images_only(model, n) for n, p in model.named_parameters())


def text_rows_trainable(model) -> bool:
    """True when a text-only batch trains something: the decoder's own weights, plain LoRA or PEFT LoRA."""
    return any(p.requires_grad and not acts_on_images_only(model, n) for n, p in model.named_parameters())


def apply_lora(model, margs: ModelArguments):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                        target_modules=margs.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    keep = {n for n, p in model.named_parameters() if p.requires_grad}  # e.g. connector, PLoRA
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # get_peft_model freezes everything but the adapters
        if name.removeprefix("base_model.model.") in keep and "lora_" not in name:
            param.requires_grad_(True)
    return model


def save_non_lora_trainables(model, folder: str) -> None:
    """The weights trained beside PEFT LoRA (connector, PLoRA, ...), which PEFT's adapter files leave out."""
    from safetensors.torch import save_file

    state = {n.removeprefix("base_model.model."): p.detach().cpu().contiguous()
             for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    save_file(state, os.path.join(folder, NON_LORA_FILE))


def load_non_lora_trainables(model, folder: str) -> None:
    """Restore the non-adapter weights trained beside LoRA (connector, PLoRA, ...) into a base or PEFT model."""
    from safetensors.torch import load_file

    path = os.path.join(folder, NON_LORA_FILE)
    if not os.path.isfile(path):
        return
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    state, known = load_file(path), dict(target.named_parameters())
    missing = [k for k in state if k not in known]
    if missing:
        raise ValueError(f"{path}: unknown parameters {missing[:5]}")
    target.load_state_dict(state, strict=False)


class SaveNonLoraTrainables(TrainerCallback):
    """PEFT checkpoints hold only the adapters: also keep the other trained weights (for resume and merge)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_non_lora_trainables(model, folder)


# --------------------------------------------------------------------------- model folders


def load_model_and_processor(path: str, dtype=None):
    model = XComposerForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    tokenizer = InternLMTokenizer.from_pretrained(path)
    return model, XComposerProcessor.for_model(model.config, tokenizer)


CARD_TITLE = "XComposer fine-tuned with finetune.py"


def merge_lora(base_path: str, adapter_dir: str, out_dir: str):
    """Base model + non-LoRA trainables + LoRA adapter -> merged, complete folder."""
    from peft import PeftModel

    if base_path is None:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            base_path = json.load(f)["base_model_name_or_path"]
    model, processor = load_model_and_processor(base_path, dtype=torch.float32)
    load_non_lora_trainables(model, adapter_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    save_model_folder(merged, processor, out_dir, title=CARD_TITLE)
    return merged


# --------------------------------------------------------------------------- training


def build_trainer(model, processor, train_dataset, training_args, margs=None, callbacks=(), recipe=None,
                  **trainer_kwargs):
    margs = margs or ModelArguments()
    if (training_args.ddp_find_unused_parameters is None and train_dataset.num_text_only
            and image_only_parameters_trainable(model)):
        # Text-only batches skip the vision tower, the connector and Partial LoRA: let DDP expect that
        # instead of computing anything on dummy images.
        training_args.ddp_find_unused_parameters = True
    for flag in ("gradient_checkpointing", "activation_checkpointing"):  # 5.x renamed the first
        if getattr(training_args, flag, False) and getattr(training_args, flag + "_kwargs", None) is None:
            # re-entrant checkpointing breaks with find_unused_parameters and frozen inputs (LoRA)
            setattr(training_args, flag + "_kwargs", {"use_reentrant": False})
    training_args.remove_unused_columns = False
    callbacks = list(callbacks) + ([SaveNonLoraTrainables()] if margs.use_lora else [])
    return RecipeTrainer(model=model, args=training_args, train_dataset=train_dataset, recipe=recipe,
                         data_collator=DataCollator(processor.tokenizer.pad_token_id),
                         processing_class=processor.tokenizer, callbacks=callbacks, **trainer_kwargs)


def finetune(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments, rargs: RecipeArguments = None):
    if not margs.model_name_or_path or not dargs.data_path:
        raise SystemExit("give --model_name_or_path and --data_path (or --recipe tiny-synthetic)")
    rargs = rargs or RecipeArguments()
    recipe = recipe_from_args(rargs, targs, margs)  # None without --stage or per-part rates
    model = load_model_for_recipe(margs.model_name_or_path, recipe, dtype="auto")
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer.from_pretrained(margs.model_name_or_path))
    image_size = rargs.image_size or (recipe.image_size if recipe else None)
    if image_size and image_size != model.config.vision_config.image_size:
        set_image_size(model, processor, image_size)
    if recipe is not None:
        apply_freezing(model, recipe)
    else:
        on = lambda value, default: default if value is None else value  # noqa: E731
        set_trainable(model, on(margs.train_vision_tower, False), on(margs.train_connector, True),
                      on(margs.train_llm, True) and not margs.use_lora, on(margs.train_plora, True))
    if margs.use_lora:
        model = apply_lora(model, margs)
    encoder = ChatEncoder(processor, dargs.system)
    if rargs.source_weights:  # each file is one source, drawn with its weight
        dataset = concat_sources([
            ConversationDataset(load_records(path), encoder, dargs.max_length,
                                dargs.image_folder or os.path.dirname(os.path.abspath(path)), dargs.skip_bad_samples)
            for path in dargs.data_path.split(",")], rargs.source_weights)
    else:
        folder = dargs.image_folder or os.path.dirname(os.path.abspath(dargs.data_path.split(",")[0]))
        dataset = ConversationDataset(load_records(dargs.data_path), encoder, dargs.max_length, folder,
                                      dargs.skip_bad_samples)
    if dataset.num_text_only and not text_rows_trainable(model):
        raise SystemExit(f"{dataset.num_text_only} text-only samples would train nothing: the decoder is frozen "
                         "(e.g. --stage xcomposer2-pretrain) and Partial LoRA acts on image tokens only; "
                         "remove them or train the LLM or LoRA")
    trainer = build_trainer(model, processor, dataset, targs, margs, recipe=recipe)
    resume = targs.resume_from_checkpoint
    if resume and margs.use_lora:
        load_non_lora_trainables(model, resume)
    trainer.train(resume_from_checkpoint=resume)
    # The Trainer gathers FSDP/DeepSpeed shards; a PeftModel saves its adapter (adapter_model.safetensors).
    trainer.save_model(targs.output_dir)
    if trainer.is_world_process_zero():
        if margs.use_lora:  # an adapter folder: the adapter, the other trained weights, the processor
            processor.save_pretrained(targs.output_dir)
            save_non_lora_trainables(model, targs.output_dir)
        else:  # a complete model folder
            write_folder_files(targs.output_dir, model.config, processor, title=CARD_TITLE,
                               parameters=model.num_parameters())
    return trainer


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if "--output_dir" not in " ".join(argv):
        argv = [*argv, "--output_dir", "finetune_output"]
    margs, dargs, rargs, targs = parser.parse_args_into_dataclasses(argv)
    if margs.recipe and margs.recipe != "tiny-synthetic":
        raise SystemExit(f"unknown recipe {margs.recipe!r}; available: tiny-synthetic")
    if margs.merge_lora:
        merge_lora(margs.model_name_or_path, margs.merge_lora, targs.output_dir)
        print(f"merged {margs.merge_lora} into {targs.output_dir}")
    elif margs.recipe:
        run_tiny_synthetic(targs.output_dir)
    else:
        return finetune(margs, dargs, targs, rargs)


# --------------------------------------------------------------------------- recipe: tiny-synthetic

# time_budget_s: training wall time, warm-up included; setup, saving and the 600-sample evaluation take
#   under a minute more.
# vision_warmup_s: stage 1 (the vision tower alone, see warm_up_vision), inside time_budget_s.
# curriculum_samples: the first samples are relation questions only (see CURRICULUM_MIX): 750 steps.
# learning_rate: 2e-3 and more left this from-scratch model predicting answer priors; 5e-4 to 8e-4 learn.
# An 84 px / 28 px-patch variant (one token per grid cell) never left the answer priors in 1,700 steps.
TINY_SYNTHETIC = dict(image_size=56, patch_size=14, train_samples=200000, curriculum_samples=36000, batch_size=48,
                      learning_rate=8e-4, warmup_steps=50, weight_decay=0.01, time_budget_s=800, vision_warmup_s=45,
                      eval_samples=600, seed=0, eval_seed=12345)


def train_synthetic_tokenizer(out_dir: str) -> str:
    """A tiny sentencepiece model of the synthetic corpus (deterministic: BPE, one thread, fixed input)."""
    import io

    import sentencepiece as spm

    import synthetic_shapes

    spm.set_random_generator_seed(0)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_shapes.corpus()), model_writer=buffer, model_type="bpe", vocab_size=96,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "\n", "user", "assistant", "system"],
        num_threads=1, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def tiny_synthetic_config(vocab_size: int, end_of_turn_id: int, image_size: int = 56,
                          patch_size: int = 14) -> XComposerConfig:
    """A small XComposer2: CLIP-style ViT (56 px, 16 image tokens), mlp2x_gelu, decoder with Partial LoRA."""
    # Relation needs a colour match in one layer feeding a column read-out in the next. It sat at chance
    # with the 7B's init (0.02, far below 1/sqrt(192)) and with 2 key/value heads shared by 6 query heads;
    # with init 0.07 and one key/value head per query head it leaves chance in 160-400 steps.
    return XComposerConfig(
        connector="mlp2x_gelu", initializer_range=0.07,
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                         initializer_range=0.07, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                         eos_token_id=[2, end_of_turn_id]))


def sincos_position_table(grid: int, width: int) -> torch.Tensor:
    """(1, 1 + grid*grid, width): CLS row zero, then x in the first half of the channels and y in the second,
    each as sines and cosines of a few frequencies (MAE-style 2D table)."""
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    angles_x, angles_y = xs.reshape(-1, 1) * frequencies, ys.reshape(-1, 1) * frequencies
    table = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), table], dim=0)[None]


def warm_up_vision(model, processor, seconds: float, seed: int, log=print) -> float:
    """Stage 1 of the recipe: the vision tower alone learns, through throw-away linear heads on each patch
    token, what lies in that token's grid cell (empty or a shape; empty or a colour) and where the token is
    (its column and row). Stage 2 then trains the whole model from tokens that each carry their own
    content and place, as real VLMs start from a pre-trained vision encoder. Per-token targets suit the
    relation question, answered by matching the question's colour to tokens and reading those same
    tokens' column. Returns the final per-token accuracy of the cell contents."""
    import random

    import synthetic_shapes

    vit_config = model.config.vision_config
    vit, size, patch = model.model.vision_tower, vit_config.image_size, vit_config.patch_size
    shapes, colours, side = list(synthetic_shapes.SHAPES), list(synthetic_shapes.COLOURS), size // patch
    head = torch.nn.Linear(vit.config.hidden_size, len(shapes) + 1 + len(colours) + 1 + 2 * side)
    where = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
    cell_of_token = (where * patch + patch // 2) * synthetic_shapes.GRID // size  # (tokens, 2): column, row
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    rng, start, step, accuracy = random.Random(seed), time.time(), 0, 0.0
    while time.time() - start < seconds:
        scenes = [synthetic_shapes.random_scene(rng, size) for _ in range(64)]
        pixels = processor.image_processor([synthetic_shapes.draw_scene(s, size) for s in scenes])["pixel_values"]
        cells = torch.zeros(len(scenes), synthetic_shapes.GRID, synthetic_shapes.GRID, 2, dtype=torch.long)
        for i, scene in enumerate(scenes):  # (shape, colour) per cell, 0 = empty
            for shape, colour, (column, row), _, _ in scene:
                cells[i, column, row] = torch.tensor([shapes.index(shape) + 1, colours.index(colour) + 1])
        targets = cells[:, cell_of_token[:, 0], cell_of_token[:, 1]]  # (N, tokens, 2)
        logits = head(vit(pixels).last_hidden_state[:, 1:])  # (N, tokens, classes)
        shape_logits, rest = logits.split([len(shapes) + 1, logits.shape[-1] - len(shapes) - 1], -1)
        colour_logits, where_logits = rest.split([len(colours) + 1, 2 * side], -1)
        cross_entropy = torch.nn.functional.cross_entropy
        loss = (cross_entropy(shape_logits.flatten(0, 1), targets[..., 0].flatten())
                + cross_entropy(colour_logits.flatten(0, 1), targets[..., 1].flatten())
                + cross_entropy(where_logits.reshape(-1, side), where.repeat(len(scenes), 1).flatten()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        accuracy = ((shape_logits.argmax(-1) == targets[..., 0]) & (colour_logits.argmax(-1) == targets[..., 1]))
        accuracy = accuracy.float().mean().item()
        if step % 50 == 0:
            log(f"vision warm-up step {step} loss {loss.item():.4f} token accuracy {accuracy:.3f}", flush=True)
    return accuracy


# Colour questions are learned first and from the mean colour alone; the others need shapes and places.
TRAIN_MIX = ("colour", "shape", "shape", "count", "relation", "relation", "relation", "relation", "compare")
# The first samples are relation questions only. Measured on this model: relation leaves chance after
# 160-400 steps on its own, but not within 900 steps of TRAIN_MIX, where the other kinds' easier gradients
# dominate; once learned it stays learned in the mix.
CURRICULUM_MIX = ("relation",)


class SyntheticRecords:
    """`n` lazily drawn samples in upstream's data format; images are callables drawing the picture. The
    first `curriculum` samples come from CURRICULUM_MIX, the rest from TRAIN_MIX (read them in order)."""

    def __init__(self, n: int, seed: int, image_size: int, curriculum: int = 0):
        self.n, self.seed, self.image_size, self.curriculum = n, seed, image_size, curriculum

    def __len__(self):
        return self.n

    def __getitem__(self, index: int) -> dict:
        import synthetic_shapes

        if not 0 <= index < self.n:
            raise IndexError(index)
        mix = CURRICULUM_MIX if index < self.curriculum else TRAIN_MIX
        sample = synthetic_shapes.sample_at(self.seed, index, self.image_size, mix[index % len(mix)])
        pictures = sample["images"]
        return {"id": f"shapes-{index}", "image": [functools.partial(lambda im: im, im) for im in pictures],
                "conversations": [{"from": "user", "value": sample["question"]},
                                  {"from": "assistant", "value": sample["answer"]}]}


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def evaluate_synthetic(model, processor, num_samples: int, seed: int, image_size: int, log=print) -> dict:
    """Greedy generation through model.chat on freshly drawn pictures; accuracy overall and per kind."""
    import synthetic_shapes

    correct, total = {}, {}
    for index in range(num_samples):
        sample = synthetic_shapes.sample_at(seed, index, image_size)
        response, _ = model.chat(processor, sample["question"], images=sample["images"], system="",
                                 max_new_tokens=8)  # "triangle" is 5 pieces of the recipe's tokenizer
        kind = sample["kind"]
        total[kind] = total.get(kind, 0) + 1
        correct[kind] = correct.get(kind, 0) + (normalize_answer(response) == normalize_answer(sample["answer"]))
    accuracy = {kind: correct[kind] / total[kind] for kind in total}
    accuracy["overall"] = sum(correct.values()) / num_samples
    return {"accuracy": accuracy, "counts": total}


class TimeBudget(TrainerCallback):
    """Sizes the run to the wall clock: the learning rate follows linear warmup then a cosine over the
    fraction of the time budget spent (so a slower or busier machine still completes the schedule), and
    training stops when the budget is spent. Also prints progress."""

    def __init__(self, budget_s: float, warmup_steps: int, log=print):
        self.start, self.budget_s, self.warmup_steps, self.log = time.time(), budget_s, warmup_steps, log

    def progress(self) -> float:
        return min(1.0, (time.time() - self.start) / self.budget_s)

    def lr_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) * 0.5 * (1 + math.cos(math.pi * self.progress()))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            elapsed = time.time() - self.start
            self.log(f"step {state.global_step} loss {float(logs['loss']):.4f} lr {float(logs.get('learning_rate', 0)):.2e} "
                     f"({elapsed:.0f}s of {self.budget_s:.0f}s, {state.global_step / elapsed:.2f} steps/s)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress() >= 1.0:
            self.log(f"time budget of {self.budget_s:.0f}s spent at step {state.global_step}", flush=True)
            control.should_training_stop = True


def run_tiny_synthetic(out_dir: str, **overrides) -> dict:
    """Train a small XComposer2 from scratch (tokenizer, vision tower, connector, decoder, Partial LoRA) on
    synthetic shapes, write a complete model folder to `out_dir`, and report held-out accuracy."""
    from transformers import AutoModelForCausalLM, AutoProcessor, set_seed

    recipe = {**TINY_SYNTHETIC, **overrides}
    start = time.time()
    torch.set_num_threads(2)
    set_seed(recipe["seed"])
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = InternLMTokenizer(vocab_file=train_synthetic_tokenizer(out_dir))
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN["mlp2x_gelu"])
    config = tiny_synthetic_config(len(tokenizer), end_of_turn_id, recipe["image_size"], recipe["patch_size"])
    model = XComposerForCausalLM(config)
    # Left/right needs each patch's place in its features: start the learned position table from a 2D sine
    # table instead of tiny random values (with those, left/right stayed at chance while colour was perfect).
    vision = config.vision_config
    with torch.no_grad():
        model.model.vision_tower.embeddings.pos_embed.copy_(
            sincos_position_table(vision.image_size // vision.patch_size, vision.hidden_size))
    processor = XComposerProcessor.for_model(config, tokenizer)
    set_trainable(model, train_vision_tower=True, train_connector=True, train_llm=True, train_plora=True)
    print(f"tiny-synthetic: vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {config.num_image_tokens} image tokens per picture", flush=True)

    accuracy = warm_up_vision(model, processor, recipe["vision_warmup_s"], recipe["seed"])
    print(f"vision warm-up: token accuracy {accuracy:.3f} after {recipe['vision_warmup_s']}s", flush=True)
    encoder = ChatEncoder(processor, system="")
    records = SyntheticRecords(recipe["train_samples"], recipe["seed"], recipe["image_size"],
                               recipe["curriculum_samples"])
    dataset = ConversationDataset(records, encoder, config.text_config.max_position_embeddings)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer_state"), per_device_train_batch_size=recipe["batch_size"],
        max_steps=10**6, learning_rate=recipe["learning_rate"], max_grad_norm=1.0, logging_steps=25,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=recipe["seed"],
        disable_tqdm=True, train_sampling_strategy="sequential")  # every record is a fresh random draw
    clock = TimeBudget(recipe["time_budget_s"] - (time.time() - start), recipe["warmup_steps"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe["learning_rate"],
                                  betas=(0.9, 0.98), weight_decay=recipe["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, clock.lr_factor)
    trainer = build_trainer(model, processor, dataset, args, callbacks=[clock], optimizers=(optimizer, scheduler))
    trainer.train()
    train_s = time.time() - start
    model.eval()
    save_model_folder(model, processor, out_dir, title="XComposer2 trained by the tiny-synthetic recipe")
    shutil.rmtree(os.path.join(out_dir, "trainer_state"), ignore_errors=True)

    # Evaluate the folder as users load it. One thread: decoding runs many tiny ops, which a second thread
    # only slows down (measured 15 ms vs 370 ms per chat on 2 busy cores).
    torch.set_num_threads(1)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)
    result = evaluate_synthetic(loaded, loaded_processor, recipe["eval_samples"], recipe["eval_seed"],
                                recipe["image_size"])
    accuracy = result["accuracy"]
    for kind, value in sorted(accuracy.items()):
        if kind != "overall":
            print(f"  {kind}: {value:.3f} (n={result['counts'][kind]})")
    size_mb = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)) / 1e6
    print(f"trained in {train_s:.0f}s, total {time.time() - start:.0f}s; folder {out_dir} ({size_mb:.1f} MB)")
    print(f"held-out accuracy: {accuracy['overall']:.3f} (n={recipe['eval_samples']})", flush=True)
    return result


if __name__ == "__main__":
    main()
