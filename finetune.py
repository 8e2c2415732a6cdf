"""Fine-tune InternLM-XComposer (v1) or XComposer2 with the Hugging Face Trainer.

    python finetune.py --model_name_or_path MODEL --data_path train.jsonl --output_dir OUT [TrainingArguments...]
    python finetune.py --model_name_or_path MODEL --merge_adapter ADAPTER_DIR --output_dir MERGED

Every TrainingArguments flag works (bf16, gradient accumulation, activation checkpointing, resume,
DDP/FSDP/DeepSpeed through accelerate or torchrun); the papers' stages are `--stage` presets
(training_recipes.py). Written against the Trainer and PEFT APIs that transformers 4.45 to 5.24 share.

Data: a JSON list or JSONL file(s) of conversations. Upstream's format
    {"id": ..., "image": [paths], "conversations": [{"from": "user", "value": "<ImageHere>..."}, {"from": "assistant", ...}]}
or the role/content form {"id": ..., "images": [...], "messages": [{"role": ..., "content": ...}]}.
One `<ImageHere>` per image, several images per sample, text-only samples mixed in; a sample with images but
no placeholder gets them in front of its first user turn. Only assistant answers are trained, including the
end-of-turn piece that ends them, so the model learns to stop.

Every sample is checked before the first step: its JSON, its turns, its placeholders against its images, its
length, and every image is read and decoded. A bad one is an error naming it (file and line for a malformed
JSONL line), or with --skip_bad_samples skipped and counted. Image paths are relative to the data file's folder
(or --image_folder); a path that leads outside it (absolute elsewhere, or through `..`) is used with a warning.
"""

import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass, field

if __name__ == "__main__":
    # Shared CPUs: with OpenMP's default spin-waiting, 2 threads on 2 busy cores ran 10-30x slower than 1
    # (measured 2-6 s vs 0.2 s per step); passive waiting keeps the second thread a gain. Set before torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import transformers
from packaging import version
from PIL import Image
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from configuration_xcomposer import LORA_TARGETS
from model_folder import save_model_folder, write_folder_files
from modeling_xcomposer import XComposerForCausalLM
from processing_xcomposer import IMAGE_PLACEHOLDER, XComposerProcessor, load_image
from tokenization_internlm import InternLMTokenizer
from training_recipes import (
    RecipeArguments,
    RecipeTrainer,
    acts_on_images_only,
    apply_freezing,
    concat_sources,
    load_model_for_recipe,
    recipe_from_args,
    set_image_size,
    set_trainable,
)

IGNORE_INDEX = -100
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "system": "system"}
# The decoder's linears only: never the vision tower, and never PartialLoRALinear's own A/B factors.
DEFAULT_LORA_TARGETS = rf"(.*\.)?language_model\.layers\.\d+\.(attention|feed_forward)\.({'|'.join(LORA_TARGETS)})"
PEFT_LORA_RANK = 16  # --lora_rank's default with --use_lora; alpha defaults to twice the rank
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
    lora_rank: int | None = field(default=None, metadata={
        "help": f"with --use_lora: PEFT's rank (default {PEFT_LORA_RANK}); without: build the decoder's own "
                "(P)LoRA adapters at this rank (as the v1 SFT stage does at 256)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "their alpha (default: PEFT 2 x rank, "
                                                                     "built-in adapters the rank)"})
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names"})
    merge_adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder: merge it into the base "
                                                                      "model, write a complete model to --output_dir"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "JSON/JSONL file(s), comma separated"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths "
                                                                     "(default: the data file's folder)"})
    max_length: int = 4096
    system: str | None = field(default=None, metadata={"help": "system prompt ('' for none; default: the "
                                                               "chat template's)"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip bad samples and malformed lines (and "
                                                                    "count them) instead of failing"})


# --------------------------------------------------------------------------- data


class BadSample(ValueError):
    pass


@dataclass(frozen=True)
class MalformedLine:
    """A JSONL line that is not valid JSON, kept in place so that it is reported (or skipped) as a bad sample."""

    path: str
    line: int
    error: str


def load_records(data_path: str) -> list:
    """The records of comma-separated JSON/JSONL files in order. A malformed JSONL line becomes a MalformedLine
    (a bad sample naming the file and line); a JSON file that does not parse is an error naming the file."""
    records = []
    for path in data_path.split(","):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        records.append(MalformedLine(path, number, str(err)))
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        records += data if isinstance(data, list) else [data]
    return records


def normalize_record(record, index: int) -> tuple[str, list[dict], list]:
    """Either data form -> (name, messages [{"role", "content"}], images). `name` is the id or the index."""
    if isinstance(record, MalformedLine):
        raise BadSample(f"{record.path} line {record.line}: not valid JSON ({record.error})")
    if not isinstance(record, dict):
        raise BadSample(f"sample {index}: expected a JSON object, got {type(record).__name__}")
    name = str(record.get("id", index))
    turns = record.get("conversations", record.get("messages"))
    if not turns:
        raise BadSample(f"sample {name}: empty conversation")
    if not isinstance(turns, list):
        raise BadSample(f"sample {name}: the conversation must be a list of turns, got {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample(f"sample {name}: turn {number} is not an object: {turn!r:.80}")
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise BadSample(f"sample {name}: a turn needs a role (user/assistant/system) and a text, "
                            f"got {turn!r:.80}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadSample(f"sample {name}: empty conversation (no assistant answer to train on)")
    images = record.get("image", record.get("images")) or []
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    for image in images:
        if not isinstance(image, (str, os.PathLike, Image.Image, np.ndarray)):
            raise BadSample(f"sample {name}: an image must be a file path, got {image!r:.80}")
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
    return name, messages, images


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
    """Validates every sample up front, images included (each is read and decoded once, so a corrupt file fails
    here and not after training started): a clear error naming the sample, or skipped and counted with
    `skip_bad_samples`. Images are read again lazily in __getitem__. Paths are relative to `image_folder`;
    those that lead outside it are used, with one warning listing them."""

    def __init__(self, records, encoder: ChatEncoder, max_length: int, image_folder: str | None = None,
                 skip_bad_samples: bool = False, log=print):
        self.records, self.encoder, self.image_folder = records, encoder, image_folder
        self.keep, self.skipped, self.num_text_only, outside = [], 0, 0, []
        for index in range(len(records)):
            try:
                name, messages, images = normalize_record(records[index], index)
                for image in images:
                    self._load(name, image)
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
            outside += [f"sample {name}: {image}" for image in images if self._outside(image)]
        if self.skipped:
            log(f"skipped {self.skipped} bad samples of {len(records)} (--skip_bad_samples)")
        if outside:
            warnings.warn(f"{len(outside)} image paths lead outside the image folder {self.image_folder} and are "
                          f"used as given: {'; '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}",
                          stacklevel=2)
        if not self.keep:
            raise ValueError("no usable training samples")

    def _path(self, image):
        return image if self.image_folder is None else os.path.join(self.image_folder, image)

    def _outside(self, image) -> bool:
        if self.image_folder is None or not isinstance(image, (str, os.PathLike)):
            return False
        folder = os.path.abspath(self.image_folder)
        return os.path.commonpath([folder, os.path.abspath(self._path(image))]) != folder

    def _load(self, name: str, image) -> Image.Image:
        """One image as an RGB PIL image: a path (relative to image_folder), a PIL image or an array."""
        if isinstance(image, (str, os.PathLike)):
            image = self._path(image)
            if not os.path.isfile(image):
                raise BadSample(f"sample {name}: image file not found: {image}")
        try:
            return load_image(image)
        except (ValueError, TypeError) as err:
            raise BadSample(f"sample {name}: {err}") from err

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, i) -> dict:
        index = self.keep[i]
        name, messages, images = normalize_record(self.records[index], index)
        input_ids, labels = self.encoder(messages)
        pixel_values = None
        if images:
            pictures = [self._load(name, image) for image in images]
            pixel_values = self.encoder.processor.image_processor(pictures)["pixel_values"]
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


# --------------------------------------------------------------------------- what trains


def apply_switches(model, margs: ModelArguments) -> dict[str, int]:
    """The train_* switches without a --stage: the connector, the LLM (unless --use_lora) and the (P)LoRA
    adapters train by default, the vision tower does not. Returns the trainable parameters per part."""
    choose = lambda value, default: default if value is None else value  # noqa: E731
    trains = dict(vision=choose(margs.train_vision_tower, False), connector=choose(margs.train_connector, True),
                  llm=choose(margs.train_llm, True) and not margs.use_lora, lora=choose(margs.train_plora, True))
    return set_trainable(model, trains)


def image_only_parameters_trainable(model) -> bool:
    """True when a text-only batch would leave trainable parameters without gradients: DDP must then look
    for unused parameters."""
    return any(p.requires_grad and acts_on_images_only(model, n) for n, p in model.named_parameters())


def text_rows_trainable(model) -> bool:
    """True when a text-only batch trains something: the decoder's own weights, plain LoRA or PEFT LoRA."""
    return any(p.requires_grad and not acts_on_images_only(model, n) for n, p in model.named_parameters())


def apply_lora(model, margs: ModelArguments):
    from peft import LoraConfig, get_peft_model

    rank = margs.lora_rank or PEFT_LORA_RANK
    config = LoraConfig(r=rank, lora_alpha=margs.lora_alpha or 2.0 * rank, lora_dropout=margs.lora_dropout,
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


class SaveCheckpointExtras(TrainerCallback):
    """What a checkpoint folder needs beside the Trainer's files: the processor (tokenizer included), and with
    PEFT LoRA the other trained weights, which the adapter files leave out (for resume and merge)."""

    def __init__(self, processor, use_lora: bool):
        self.processor, self.use_lora = processor, use_lora

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.processor.save_pretrained(folder)
            if self.use_lora:
                save_non_lora_trainables(model, folder)


# --------------------------------------------------------------------------- model folders


def dtype_argument(dtype) -> dict:
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    keyword = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    return {} if dtype is None else {keyword: dtype}


def load_model_and_processor(path: str, dtype="auto"):
    model = XComposerForCausalLM.from_pretrained(path, **dtype_argument(dtype))
    tokenizer = InternLMTokenizer.from_pretrained(path)
    return model, XComposerProcessor.for_model(model.config, tokenizer)


CARD_TITLE = "XComposer fine-tuned with finetune.py"


def merge_adapter(base_path: str | None, adapter_dir: str, out_dir: str):
    """Base model + non-LoRA trainables + PEFT LoRA adapter -> merged, complete folder. (Not the model's own
    `merge_lora()`, which folds v1's built-in LoRA into its weights.)"""
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
    """A RecipeTrainer for the model and dataset; the processor goes into every checkpoint (a callback, since
    Trainer's own keyword for it is `tokenizer=` on 4.45 and `processing_class=` from 4.46 on)."""
    margs = margs or ModelArguments()
    if (training_args.ddp_find_unused_parameters is None and getattr(train_dataset, "num_text_only", 0)
            and image_only_parameters_trainable(model)):
        # Text-only batches skip the vision tower, the connector and Partial LoRA: let DDP expect that
        # instead of computing anything on dummy images.
        training_args.ddp_find_unused_parameters = True
    for flag in ("gradient_checkpointing", "activation_checkpointing"):  # 5.x renamed the first
        if getattr(training_args, flag, False) and getattr(training_args, flag + "_kwargs", None) is None:
            # re-entrant checkpointing breaks with find_unused_parameters and frozen inputs (LoRA)
            setattr(training_args, flag + "_kwargs", {"use_reentrant": False})
    training_args.remove_unused_columns = False
    callbacks = [*callbacks, SaveCheckpointExtras(processor, margs.use_lora)]
    return RecipeTrainer(model=model, args=training_args, train_dataset=train_dataset, recipe=recipe,
                         data_collator=DataCollator(processor.tokenizer.pad_token_id), callbacks=callbacks,
                         **trainer_kwargs)


def finetune(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments, rargs: RecipeArguments = None):
    if not margs.model_name_or_path or not dargs.data_path:
        raise SystemExit("give --model_name_or_path and --data_path")
    rargs = rargs or RecipeArguments()
    recipe = recipe_from_args(rargs, targs, margs)  # None without --stage or per-part rates
    model = load_model_for_recipe(margs.model_name_or_path, recipe, **dtype_argument("auto"))
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer.from_pretrained(margs.model_name_or_path))
    image_size = rargs.image_size or (recipe.image_size if recipe else None)
    if image_size and image_size != model.config.vision_config.image_size:
        set_image_size(model, processor, image_size)
    if recipe is not None:
        apply_freezing(model, recipe)
    else:
        apply_switches(model, margs)
    if margs.use_lora:
        model = apply_lora(model, margs)
    encoder = ChatEncoder(processor, dargs.system)

    def dataset_of(paths: str):
        folder = dargs.image_folder or os.path.dirname(os.path.abspath(paths.split(",")[0]))
        return ConversationDataset(load_records(paths), encoder, dargs.max_length, folder, dargs.skip_bad_samples)

    if rargs.source_weights:  # each file is one source, drawn with its weight
        dataset = concat_sources([dataset_of(path) for path in dargs.data_path.split(",")], rargs.source_weights)
    else:
        dataset = dataset_of(dargs.data_path)
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
    if margs.merge_adapter:
        merge_adapter(margs.model_name_or_path, margs.merge_adapter, targs.output_dir)
        print(f"merged {margs.merge_adapter} into {targs.output_dir}")
    else:
        return finetune(margs, dargs, targs, rargs)


if __name__ == "__main__":
    main()
