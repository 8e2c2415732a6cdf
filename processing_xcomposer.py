"""Image processor, processor and chat templates for InternLM-XComposer v1 and XComposer2.

Preprocessing follows upstream exactly: an RGB PIL image is resized to a square with PIL bicubic,
divided by 255 and normalized with CLIP's mean/std (torchvision Resize/ToTensor/Normalize on PIL).
The processor expands each `<ImageHere>` into `num_image_tokens` copies of `image_token_id`, llava
style, and tokenizes the text between placeholders separately, BOS only at the start of a sample.
XComposer-2.5 / 4KHD (high-resolution tiles) have their own pair at the end of the file: the image processor
makes a global view and tiles per image, and the processor expands each placeholder by its image's count.
"""

import base64
import binascii
import io
import json
import math
import os
import re
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import AddedToken, BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

try:  # as remote code, inside transformers' dynamic package
    from .configuration_xcomposer import HD_MERGE, HD_PADDINGS, hd_image_tokens
    from .transformers_compat import declare_processor_parts
except ImportError:  # from a checkout, where scripts and tests import the flat modules directly
    try:  # a try of its own: transformers 4.x's scan for missing packages skips only try blocks
        from configuration_xcomposer import HD_MERGE, HD_PADDINGS, hd_image_tokens
        from transformers_compat import declare_processor_parts
    except ImportError:
        raise

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PLACEHOLDER = "<ImageHere>"

DEFAULT_SYSTEM_PROMPT_V2 = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed "
    "by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image."
)

# Shared by both templates: a string content is used as is; in a list content an image item becomes
# the placeholder and a text item its text. System messages are rendered first.
_RENDER_CONTENT = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is iterable -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<ImageHere>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}\n"
)


def _v2_template(default_system: str | None) -> str:
    """v2 turns `[UNUSED_TOKEN_146]{role}\n{content}[UNUSED_TOKEN_145]\n`. Without a system message the prompt
    gets `default_system` as its system turn, or none when it is None; a system message with empty content
    means no system turn."""
    default = "" if default_system is None else (
        "{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 -%}"
        "{{- '[UNUSED_TOKEN_146]system\\n' + '" + default_system.replace("\n", "\\n") + "' + '[UNUSED_TOKEN_145]\\n' -}}"
        "{%- endif -%}")
    return _RENDER_CONTENT + default + (
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set content = render(message['content']) -%}"
        "{%- if content -%}{{- '[UNUSED_TOKEN_146]system\\n' + content + '[UNUSED_TOKEN_145]\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{{- '[UNUSED_TOKEN_146]' + message['role'] + '\\n' + render(message['content']) + '[UNUSED_TOKEN_145]\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[UNUSED_TOKEN_146]assistant\\n' -}}{%- endif -%}")


# XComposer2's template adds its default system prompt; models trained without one (the embedded model,
# XComposer-2.5, which sends a system turn only when asked) use the template without it.
CHAT_TEMPLATE_V2 = _v2_template(DEFAULT_SYSTEM_PROMPT_V2)
CHAT_TEMPLATE_V2_NO_DEFAULT_SYSTEM = _v2_template(None)

# v1: a user turn already ends with the bot prompt ` <|Bot|>:`, so add_generation_prompt adds
# nothing; an assistant turn is `{content}<TOKENS_UNUSED_1>\n`; no default system prompt.
CHAT_TEMPLATE_V1 = _RENDER_CONTENT + (
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set content = render(message['content']) -%}"
    "{%- if content -%}{{- content + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' <|User|>:' + render(message['content']) + '\\n<TOKENS_UNUSED_0> <|Bot|>:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- render(message['content']) + '<TOKENS_UNUSED_1>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# The chat format of each generation, keyed by config.connector: its template and the piece that ends a turn
# (generation stops there, and fine-tuning trains it as the last piece of every answer).
CHAT_TEMPLATES = {"mlp2x_gelu": CHAT_TEMPLATE_V2, "perceive_sampler": CHAT_TEMPLATE_V1}
END_OF_TURN = {"mlp2x_gelu": "[UNUSED_TOKEN_145]", "perceive_sampler": "<TOKENS_UNUSED_1>"}
# Every control piece of each chat format (turn markers, v1's role names), keyed by config.connector.
CHAT_MARKERS = {"mlp2x_gelu": ("[UNUSED_TOKEN_146]", END_OF_TURN["mlp2x_gelu"]),
                "perceive_sampler": ("<TOKENS_UNUSED_0>", END_OF_TURN["perceive_sampler"], "<|User|>", "<|Bot|>")}


class XComposerImagesKwargs(ImagesKwargs, total=False):
    image_size: int


def _to_uint8(array: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map a high-bit-depth or float array to 0..255. With `full_scale` the value range is fixed
    (16-bit data: 65535, unit floats: 1.0); otherwise the finite min..max range is stretched."""
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    array = np.where(finite, array, 0.0)
    if full_scale is None:
        low, high = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
        full_scale = high - low if high > low else 1.0
        array = array - low
    return np.clip(np.rint(array * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    """Choose the range of a 16/32-bit integer or float array: unsigned 16-bit data (PIL I;16, or I
    holding 0..65535 as PIL loads 16-bit PNG/TIFF), unit floats, else the data's own min..max."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "ui":
        if array.dtype.itemsize <= 2 and array.dtype.kind == "u":
            return _to_uint8(array, 65535.0)
        in_16bit = array.size == 0 or (array.min() >= 0 and array.max() <= 65535)
        return _to_uint8(array, 65535.0 if in_16bit else None)
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        return _to_uint8(array, 1.0 if unit else None)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    raise ValueError(f"unsupported image array dtype {array.dtype}")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HWC (C in 1, 3, 4) or HW numpy array -> PIL image in L, RGB or RGBA."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an HW array or an HWC array with 1, 3 or 4 channels, got shape {array.shape}")
    # uint8 arrays of shape HW, HW3, HW4 are read by PIL as L, RGB, RGBA
    return Image.fromarray(np.ascontiguousarray(_wide_to_uint8(array)))


# Bounds on what an image argument may make us fetch: untrusted URLs never hang a run or fill the memory.
DOWNLOAD_TIMEOUT_S = 20
MAX_DOWNLOAD_BYTES = 64 * 2**20


def load_image(image) -> Image.Image:
    """Any supported input -> RGB PIL image, as upstream's `Image.open(path).convert('RGB')`.

    A PIL image, an HW/HWC array, a path, or a URL as transformers takes them: `file://`, `http(s)://`
    (downloaded with a timeout and a size cap) and `data:image/...;base64,`. Unreadable, empty or
    decompression-bomb images are a ValueError naming the source."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_source(os.fspath(image))
    elif isinstance(image, np.ndarray):
        if image.size == 0:
            raise ValueError(f"the image array of shape {image.shape} has no pixels")
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a file path, a URL or an HWC numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is {image.width}x{image.height}: it has no pixels")

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # A plain convert('RGB') clips these to 0..255 (a 16-bit image becomes almost all white).
        image = Image.fromarray(_wide_to_uint8(np.asarray(image)))  # mode L
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from err
    return image


def _open_source(source: str) -> Image.Image:
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError(f"cannot read image {source[:40]!r}...: a data URL must be data:image/...;base64,...")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise ValueError(f"cannot read image {source[:40]!r}...: invalid base64 ({err})") from err
        return _open_file(io.BytesIO(data), "a data: URL")
    if source.startswith(("http://", "https://")):
        return _open_file(io.BytesIO(_download(source)), source)
    if source.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    return _open_file(source, source)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (OSError, ValueError) as err:  # URLError, HTTPError and timeouts are OSErrors
        raise ValueError(f"cannot download image {url!r}: {err}") from err
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"image {url!r} is larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
    return data


def _open_file(file, name: str) -> Image.Image:
    try:
        with Image.open(file) as opened:
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as err:
        raise ValueError(f"cannot read image file {name!r}: it decodes to too many pixels ({err})") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError too
        raise ValueError(f"cannot read image file {name!r}: {err}") from err


def _message_image(item: dict):
    """The image of a chat content item, in the ways transformers' chat messages name it."""
    for key in ("image", "url", "path"):
        if item.get(key) is not None:
            return item[key]
    if item.get("base64") is not None:
        return "data:image/png;base64," + item["base64"]
    raise ValueError(f"an image item needs 'image', 'url', 'path' or 'base64', got keys {sorted(item)}")


class XComposerImageProcessor(BaseImageProcessor):
    """Square bicubic resize, /255, CLIP normalization; 490 px for XComposer2-VL, 224 for v1."""

    model_input_names = ["pixel_values"]
    valid_kwargs = XComposerImagesKwargs

    def __init__(self, image_size: int = 490, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]

    @classmethod
    def for_model(cls, config) -> "XComposerImageProcessor":
        """The image processor of a model config (XComposerHDImageProcessor for high-resolution models)."""
        if getattr(config, "dynamic_tiles", False):
            return XComposerHDImageProcessor.for_model(config)
        return cls(image_size=config.vision_config.image_size)

    def preprocess(self, images, image_size: int | None = None, return_tensors="pt", **kwargs) -> BatchFeature:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; XComposerImageProcessor takes image_size")
        if not isinstance(images, (list, tuple)):
            images = [images]
        size = int(image_size or self.image_size)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = []
        for image in images:
            rgb = load_image(image).resize((size, size), Image.BICUBIC)
            array = np.asarray(rgb, dtype=np.float32) / np.float32(255)  # (S, S, 3), ToTensor
            pixels.append(((array - mean) / std).transpose(2, 0, 1))  # (3, S, S), Normalize
        pixel_values = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), dtype=np.float32)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


class XComposerProcessor(ProcessorMixin):
    """Image processor + tokenizer; expands each `<ImageHere>` into `num_image_tokens` image ids.

    At construction it makes the image id a special added token of the tokenizer when that is the next free
    id (so tokens added later never take it, and decoding drops it), and marks the chat format's markers as
    control tokens (decoding with skip_special_tokens drops them). Text in chat messages is encoded as plain
    text: a chat marker or `<s>` that a user types stays characters, unless `raw_content=True`."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        image_token: str = IMAGE_PLACEHOLDER,
        end_of_turn: str | None = None,
        chat_template: str | None = None,
    ):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if not isinstance(image_token_id, int):
            raise ValueError(f"image_token_id must be an int, got {image_token_id!r}")
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.image_token = image_token
        self.end_of_turn = end_of_turn
        connector = next((c for c, piece in END_OF_TURN.items() if piece == end_of_turn), None)
        if chat_template is None and connector is not None:  # e.g. a 4.45 reading a 5.x folder's .jinja file
            chat_template = CHAT_TEMPLATES[connector]
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        if len(tokenizer) == image_token_id and image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if connector is not None and hasattr(tokenizer, "set_control_tokens") and not tokenizer.control_tokens:
            tokenizer.set_control_tokens(CHAT_MARKERS[connector])

    @classmethod
    def for_model(cls, config, tokenizer) -> "XComposerProcessor":
        """The processor that matches a model config: its image size, image tokens, chat format and length
        (XComposerHDProcessor for high-resolution models)."""
        if getattr(config, "dynamic_tiles", False) and not issubclass(cls, XComposerHDProcessor):
            return XComposerHDProcessor.for_model(config, tokenizer)
        if tokenizer.model_max_length > 10**12:  # unset: transformers' "very large" default
            tokenizer.model_max_length = config.text_config.max_position_embeddings
        return cls(
            image_processor=XComposerImageProcessor.for_model(config),
            tokenizer=tokenizer,
            num_image_tokens=config.num_image_tokens,
            image_token_id=config.image_token_id,
            end_of_turn=END_OF_TURN[config.connector],
            chat_template=CHAT_TEMPLATES[config.connector],
        )

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' save, then in the layout every release reads: the image processor in its own
        preprocessor_config.json (5.x nests it in processor_config.json, which 4.45-4.56 cannot read) and the
        chat template as chat_template.jinja and chat_template.json."""
        result = super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "processor_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        nested = config.pop("image_processor", None)
        if nested is not None:
            _write_json(os.path.join(save_directory, "preprocessor_config.json"),
                        {**nested, "processor_class": type(self).__name__})
            _write_json(path, config)
        if self.chat_template is not None:  # both spellings: .jinja (read since 4.52) and .json (read before)
            _write_json(os.path.join(save_directory, "chat_template.json"), {"chat_template": self.chat_template})
            with open(os.path.join(save_directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        return result

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at eos or at the piece that ends a turn."""
        ids = [self.tokenizer.eos_token_id]
        if self.end_of_turn is not None:
            ids.append(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        return ids

    @property
    def max_length(self) -> int | None:
        """The tokenizer's model_max_length, when it is a real bound (writers set it to the model's)."""
        limit = self.tokenizer.model_max_length
        return limit if limit <= 10**12 else None

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one prompt, each `<ImageHere>` expanded into `num_image_tokens` image ids."""
        return self._expand(text.split(self.image_token), add_special_tokens)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        padding: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Text as a raw prompt (chat markers act as markers; apply_chat_template takes messages), its images where
        its `<ImageHere>` placeholders are; a sample without any gets one per image in front. A bare question
        (no placeholder, no chat marker) given with images goes, as `model.chat` takes it, in a user turn of the
        chat template with the generation prompt. `max_length` defaults to the tokenizer's model_max_length."""
        _check_call(text, images, videos, audio, kwargs)
        if text is None:
            return self.image_processor(_flatten_images(images), return_tensors=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = _split_images(images, len(texts))
        if per_sample is None and images is not None and not any(self.image_token in t for t in texts):
            per_sample = [_flatten_images(images)] if len(texts) == 1 else None
        # A bare question given with images (as the image-text-to-text pipeline passes one) goes, as model.chat
        # takes it, in a user turn of the chat template, its images in front.
        questions = {i for i, (t, ims) in enumerate(zip(texts, per_sample or ())) if ims and self._is_question(t)}
        max_length = self.max_length if max_length is None else max_length
        batch_ids, placeholders = [], 0
        for index, sample in enumerate(texts):
            if index in questions:
                turn = [{"role": "user", "content": self.image_token * len(per_sample[index]) + sample}]
                batch_ids.append(self.encode_messages(turn, add_generation_prompt=True, max_length=max_length))
                placeholders += len(per_sample[index])
                continue
            if per_sample is not None and self.image_token not in sample:
                sample = self.image_token * len(per_sample[index]) + sample
            chunks = sample.split(self.image_token)
            placeholders += len(chunks) - 1
            if per_sample is not None and len(per_sample[index]) != len(chunks) - 1:
                raise ValueError(f"sample {index} has {len(chunks) - 1} {self.image_token} placeholders but "
                                 f"{len(per_sample[index])} images were given for it")
            self._check_length(index, sample, None, max_length)
            self._check_text(sample)
            ids = self._expand(chunks, add_special_tokens)
            self._check_length(index, sample, len(ids), max_length)
            batch_ids.append(ids)
        flat_images = _flatten_images(images)
        if len(flat_images) != placeholders:
            raise ValueError(f"the text has {placeholders} {self.image_token} placeholders but {len(flat_images)} "
                             f"images were given")
        data = self._pad(batch_ids, padding, max_length, return_tensors)
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=return_tensors))
        return BatchFeature(data)

    def _is_question(self, text: str) -> bool:
        """A bare question: no image placeholder and none of the chat format's markers."""
        markers = CHAT_MARKERS.get(next((c for c, piece in END_OF_TURN.items() if piece == self.end_of_turn), ""), ())
        return self.image_token not in text and not any(marker in text for marker in markers)

    @staticmethod
    def _check_text(text: str) -> None:
        """sentencepiece takes UTF-8: a lone surrogate (e.g. from a bad decode upstream) is named, not a crash."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text has a lone surrogate (U+{ord(text[err.start]):04X}) at index {err.start}; "
                             f"it is not valid Unicode text") from None

    def _check_length(self, index: int, text: str, num_tokens: int | None, max_length: int | None) -> None:
        """Too long is an error, never a truncation. Before tokenizing, a text longer than any max_length tokens
        could cover (each token is at most the longest piece) is refused by its length alone."""
        if max_length is None:
            return
        if num_tokens is None:
            if len(text) <= max_length * _longest_piece(self.tokenizer):
                return
            found = f"{len(text):,} characters long, more than {max_length} tokens can hold"
        elif num_tokens > max_length:
            found = f"{num_tokens} tokens long, more than max_length={max_length}"
        else:
            return
        hint = ""
        if DEFAULT_SYSTEM_PROMPT_V2 in text:
            hint = ("; the chat template's default system prompt takes part of it: a system message with empty "
                    "content (system=\"\" in model.chat) drops it")
        raise ValueError(f"prompt too long: sample {index} is {found}{hint}")

    def _expand(self, chunks: list[str], add_special_tokens: bool) -> list[int]:
        """Tokenize the text between placeholders separately; only the first chunk (possibly empty)
        gets the tokenizer's special tokens, so a sample has a single BOS at its very start."""
        ids = []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids += [self.image_token_id] * self.num_image_tokens
            if chunk or (i == 0 and add_special_tokens):
                ids += self.tokenizer(chunk, add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        return ids

    def _pad(self, batch_ids, padding, max_length, return_tensors) -> dict:
        """Left padding with the tokenizer's pad id (decoder-only generation appends on the right)."""
        lengths = [len(ids) for ids in batch_ids]
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (True, "longest"):
            target = max(lengths)
        elif padding in (False, "do_not_pad", None):
            target = None
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")

        if target is None:
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(f"samples have different lengths {lengths}; pass padding=True to batch them")
            input_ids, attention_mask = batch_ids, [[1] * n for n in lengths]
        else:
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
            input_ids = [[pad_id] * (target - n) + ids for ids, n in zip(batch_ids, lengths)]
            attention_mask = [[0] * (target - n) + [1] * n for n in lengths]

        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors == "pt":
            return {key: torch.tensor(value, dtype=torch.long) for key, value in data.items()}
        if return_tensors == "np":
            return {key: np.asarray(value, dtype=np.int64) for key, value in data.items()}
        if return_tensors is None:
            return data
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ----------------------------------------------------------- chat messages

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = "pt",
                            continue_final_message: bool = False, raw_content: bool = False, images=None,
                            processor_kwargs: dict | None = None, **kwargs):
        """The chat template on one conversation or a batch, the same on every transformers release. With
        tokenize=True the images in the messages ({"type": "image", "image"|"url"|"path"|"base64": ...}) are
        loaded, or `images` fill the `<ImageHere>` placeholders of string contents in order, and the text is
        encoded as plain text (see the class). `continue_final_message` leaves the last message open, for a
        prefilled answer."""
        batch = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batch else [conversation]
        options = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message)
        if not tokenize:
            texts = [self._render(c, **options) for c in conversations]
            return texts if batch else texts[0]
        if kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError("return_assistant_tokens_mask is not supported; finetune.py builds answer-only labels")
        processor_kwargs = {**(processor_kwargs or {}), **kwargs}
        max_length = processor_kwargs.pop("max_length", None)
        padding = processor_kwargs.pop("padding", True)
        if processor_kwargs:
            raise TypeError(f"unexpected arguments {sorted(processor_kwargs)}")
        ids = [self.encode_messages(c, raw_content=raw_content, max_length=max_length, **options)
               for c in conversations]
        in_messages = [_message_image(item) for c in conversations for message in c
                       for item in (message["content"] if isinstance(message["content"], (list, tuple)) else ())
                       if isinstance(item, dict) and item.get("type") == "image"]
        if in_messages and images:
            raise ValueError("give images either inside the messages or as images=, not both")
        images = in_messages or _flatten_images(images)
        slots = sum(sample.count(self.image_token_id) for sample in ids) // self.num_image_tokens
        if slots != len(images):
            raise ValueError(f"the conversation has {slots} {self.image_token} placeholders but {len(images)} images "
                             f"were given")
        data = self._pad(ids, padding, max_length, return_tensors)
        if images:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        data = BatchFeature(data)
        return data if return_dict else data["input_ids"]

    def encode_messages(self, messages, chat_template: str | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, raw_content: bool = False,
                        max_length: int | None = None) -> list[int]:
        """Token ids of a conversation as the chat template renders it, `<ImageHere>` expanded. The prompt is
        tokenized as upstream tokenized it (in one piece between images), except that in message text a chat
        marker, `<s>` or another added token is broken apart so it stays characters (`raw_content=False`)."""
        marked, texts = _mark_texts(messages)
        rendered = self._render(marked, chat_template, add_generation_prompt, continue_final_message)
        parts = _MARK.split(rendered)  # template text, then (index, template text) pairs
        text, breaks = parts[0], []
        for index, template_text in zip(parts[1::2], parts[2::2]):
            content = texts[int(index)]
            if not raw_content:
                breaks += [len(text) + start + 1 for start in _occurrences(content, self._protected_strings())]
            text += content + template_text
        self._check_length(0, text, None, self.max_length if max_length is None else max_length)
        self._check_text(text)
        segments = [text[a:b] for a, b in zip([0, *breaks], [*breaks, len(text)])]
        ids = [i for k, segment in enumerate(segments) for i in self.encode_prompt(segment, k == 0)]
        self._check_length(0, text, len(ids), self.max_length if max_length is None else max_length)
        return ids

    def _render(self, messages, chat_template=None, add_generation_prompt=False, continue_final_message=False) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template; pass chat_template=")
        text = self.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt and not continue_final_message)
        if continue_final_message:  # cut after the last message's text, as transformers does
            last = messages[-1]["content"]
            last = last if isinstance(last, str) else "".join(i.get("text", "") for i in last if isinstance(i, dict))
            end = text.rfind(last)
            if not last.strip() or end < 0:
                raise ValueError("continue_final_message needs a final message with text that the template renders")
            text = text[: end + len(last)]
        return text

    def _protected_strings(self) -> list[str]:
        """What user text may not produce as a control id: added tokens (<s>, </s>, ...) and chat markers."""
        tokenizer = self.tokenizer
        strings = set(tokenizer.get_added_vocab()) | set(getattr(tokenizer, "control_tokens", ()))
        return sorted(strings - {self.image_token})

    # ----------------------------------------------------------- decoding

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(self._without_image_ids(token_ids), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decoded texts of generated sequences (the image-text-to-text pipeline's hook)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def _without_image_ids(self, token_ids) -> list[int]:
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        return [i for i in ids if i != self.image_token_id]


def _check_call(text, images, videos, audio, unexpected: dict) -> None:
    """The arguments a processor call must have: text and/or images, nothing else."""
    if unexpected:
        raise TypeError(f"unexpected arguments {sorted(unexpected)}")
    if videos is not None or audio is not None:
        raise ValueError("XComposerProcessor takes only text and images")
    if text is None and images is None:
        raise ValueError("give text, images or both")
    if text is not None and (not isinstance(text, (str, list, tuple)) or not text
                             or not all(isinstance(t, str) for t in ([text] if isinstance(text, str) else text))):
        raise TypeError("text must be a string or a non-empty list of strings")


def _is_image_list(images) -> bool:
    return isinstance(images, (list, tuple))


def _split_images(images, batch_size: int):
    """Per-sample image lists when `images` is a list of lists (one per sample), else None."""
    if not _is_image_list(images) or not any(_is_image_list(item) for item in images):
        return None
    if not all(_is_image_list(item) for item in images):
        raise ValueError("images must be a flat list or a list of lists (one per sample), not a mix")
    if len(images) != batch_size:
        raise ValueError(f"got image lists for {len(images)} samples but {batch_size} texts")
    return [list(item) for item in images]


def _flatten_images(images) -> list:
    if images is None:
        return []
    if not _is_image_list(images):
        return [images]
    return [image for item in images for image in (item if _is_image_list(item) else [item])]


# Saved folders are remote-code repositories: save_pretrained writes the auto_map entries
# (AutoProcessor, AutoImageProcessor) and copies this file next to the configs.
XComposerImageProcessor.register_for_auto_class("AutoImageProcessor")
XComposerProcessor.register_for_auto_class("AutoProcessor")
declare_processor_parts(XComposerProcessor, attributes=["image_processor", "tokenizer"],
                        image_processor_class="AutoImageProcessor", tokenizer_class="AutoTokenizer",
                        valid_kwargs=["num_image_tokens", "image_token_id", "image_token", "end_of_turn", "chat_template"])


# --------------------------------------------------------------------------- XComposer-2.5 / 4KHD: images as tiles


class XComposerHDImagesKwargs(ImagesKwargs, total=False):
    hd_num: int


class XComposerHDImageProcessor(BaseImageProcessor):
    """XComposer-2.5 / 4KHD preprocessing: an image becomes a global view plus a grid of tiles.

    Per image (RGB): a portrait image is transposed (PIL TRANSPOSE) and the steps run in the landscape frame;
    `scale` is the largest s with s * ceil(s / ratio) <= hd_num (ratio = width / height), with `clamp` (2.5) at
    most ceil(width / tile); the image is resized to int(scale * tile) x int(that / ratio) (truncated; PIL
    bilinear, which is what torchvision's resize does to a PIL image) and padded with white to a multiple of the
    tile in height, at the bottom or centred (`padding`); it is transposed back, divided by 255 and normalized.
    The views are the whole tensor resized to tile x tile (torch bicubic, align_corners False) and then the tiles,
    row-major. `pixel_values` (all views of all images, 3, tile, tile) and `image_grid` (num_images, 2): the
    (rows, cols) of each image's tiles. Nothing is resized to fit anything else."""

    model_input_names = ["pixel_values", "image_grid"]
    valid_kwargs = XComposerHDImagesKwargs

    def __init__(self, tile_size: int = 560, patch_size: int = 14, hd_num: int = 24, hd_num_multi: int = 6,
                 padding: str = "bottom", clamp: bool = True, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.tile_size, self.patch_size, self.hd_num, self.hd_num_multi = tile_size, patch_size, hd_num, hd_num_multi
        self.padding, self.clamp = padding, clamp
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        for name in ("tile_size", "patch_size", "hd_num", "hd_num_multi"):
            _check_budget(name, getattr(self, name))
        if padding not in HD_PADDINGS:
            raise ValueError(f"padding must be one of {HD_PADDINGS}, got {padding!r}")
        if not isinstance(clamp, bool):
            raise ValueError(f"clamp must be true or false, got {clamp!r}")
        if tile_size % (patch_size * HD_MERGE):
            raise ValueError(f"tile_size ({tile_size}) must be a multiple of {HD_MERGE} patches of {patch_size} px")

    @classmethod
    def for_model(cls, config) -> "XComposerHDImageProcessor":
        vision = config.vision_config
        return cls(tile_size=vision.image_size, patch_size=vision.patch_size, hd_num=config.hd_num,
                   hd_num_multi=config.hd_num_multi, padding=config.hd_padding, clamp=config.hd_clamp)

    def budget(self, num_images: int) -> int:
        """The tile budget of each image of a prompt with `num_images` images (upstream 2.5: 24, or 6 each)."""
        return self.hd_num if num_images <= 1 else self.hd_num_multi

    def num_image_tokens(self, rows: int, cols: int) -> int:
        return hd_image_tokens(rows, cols, self.tile_size // self.patch_size // HD_MERGE)

    def layout(self, width: int, height: int, hd_num: int) -> dict:
        """Where an image of width x height goes, in the landscape frame: transposed, resized size, padded height,
        top padding, and its tile grid (rows, cols) in the image's own orientation."""
        transposed = width < height
        if transposed:
            width, height = height, width
        ratio, tile = width / height, self.tile_size
        low, high = 1, hd_num  # s * ceil(s / ratio) grows with s, and s = 1 always fits (ratio >= 1)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if mid * math.ceil(mid / ratio) <= hd_num else (low, mid - 1)
        scale = min(math.ceil(width / tile), low) if self.clamp else low
        new_w = int(scale * tile)
        new_h = int(new_w / ratio)
        if new_h < 1:
            raise ValueError(f"an image of {width}x{height} px is too elongated for {scale} tiles of {tile} px: its "
                             f"short side would shrink to nothing")
        padded = math.ceil(new_h / tile) * tile
        if new_w * padded > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"hd_num={hd_num} would make a {new_w}x{padded} px canvas, more than PIL's limit of "
                             f"{Image.MAX_IMAGE_PIXELS:,} pixels")
        top = 0 if self.padding == "bottom" else int((padded - new_h) / 2)
        rows, cols = padded // tile, new_w // tile
        return dict(transposed=transposed, size=(new_w, new_h), padded=padded, top=top,
                    grid=(cols, rows) if transposed else (rows, cols))

    def canvas(self, image, hd_num: int) -> tuple:
        """The padded, normalized image -> ((3, rows * tile, cols * tile) float tensor, (rows, cols))."""
        rgb = load_image(image)
        place = self.layout(rgb.width, rgb.height, hd_num)
        if place["transposed"]:
            rgb = rgb.transpose(Image.TRANSPOSE)
        resized = rgb.resize(place["size"], Image.BILINEAR)
        padded = Image.new("RGB", (place["size"][0], place["padded"]), (255, 255, 255))
        padded.paste(resized, (0, place["top"]))
        if place["transposed"]:
            padded = padded.transpose(Image.TRANSPOSE)
        array = np.asarray(padded, dtype=np.float32) / np.float32(255)  # ToTensor
        mean, std = np.asarray(self.image_mean, dtype=np.float32), np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy()), place["grid"]

    def views(self, canvas: torch.Tensor, grid: tuple) -> torch.Tensor:
        """(3, rows * T, cols * T) -> (1 + rows * cols, 3, T, T): the global view, then the tiles row-major."""
        (rows, cols), tile = grid, self.tile_size
        whole = F.interpolate(canvas[None], size=(tile, tile), mode="bicubic", align_corners=False)
        tiles = canvas.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
        return torch.cat([whole, tiles])

    def preprocess(self, images, hd_num: int | None = None, return_tensors="pt", **kwargs) -> BatchFeature:
        """The images of one prompt; each gets at most `hd_num` tiles (default: `budget(len(images))`)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; XComposerHDImageProcessor takes hd_num")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        hd_num = self.budget(len(images)) if hd_num is None else hd_num
        _check_budget("hd_num", hd_num)
        views, grids = [], []
        for image in images:
            canvas, grid = self.canvas(image, hd_num)
            views.append(self.views(canvas, grid))
            grids.append(grid)
        tile = self.tile_size
        data = {"pixel_values": torch.cat(views) if views else torch.zeros(0, 3, tile, tile),
                "image_grid": torch.tensor(grids, dtype=torch.long).reshape(-1, 2)}
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return BatchFeature(data, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def _check_budget(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class XComposerHDProcessor(XComposerProcessor):
    """The processor of XComposer-2.5 / 4KHD: as XComposerProcessor, but each `<ImageHere>` expands into as many
    image ids as its image yields (`image_processor.num_image_tokens` of its tile grid), one run per image, and
    `hd_num=` sets the tile budget of every image (default: hd_num for a sample with one image, hd_num_multi each
    for several). A sample or conversation with exactly one image and no placeholder shows the image before the
    whole prompt, right after BOS, as upstream 2.5 builds it. Samples with images of different sizes batch
    (left-padded); `image_grid` tells the model which views belong to which image."""

    def __init__(self, image_processor=None, tokenizer=None, image_token_id: int | None = None,
                 image_token: str = IMAGE_PLACEHOLDER, end_of_turn: str | None = None, chat_template: str | None = None,
                 num_image_tokens=None):
        # num_image_tokens: the base's fixed count is one id per placeholder here, widened per image (`_widen`)
        if chat_template is None:
            chat_template = CHAT_TEMPLATE_V2_NO_DEFAULT_SYSTEM
        super().__init__(image_processor, tokenizer, num_image_tokens=1, image_token_id=image_token_id,
                         image_token=image_token, end_of_turn=end_of_turn, chat_template=chat_template)
        self.num_image_tokens = None

    @classmethod
    def for_model(cls, config, tokenizer) -> "XComposerHDProcessor":
        if tokenizer.model_max_length > 10**12:  # unset: transformers' "very large" default
            tokenizer.model_max_length = config.text_config.max_sequence_length
        return cls(image_processor=XComposerHDImageProcessor.for_model(config), tokenizer=tokenizer,
                   image_token_id=config.image_token_id, end_of_turn=END_OF_TURN[config.connector],
                   chat_template=CHAT_TEMPLATE_V2_NO_DEFAULT_SYSTEM)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid"]

    def _expand(self, chunks: list[str], add_special_tokens: bool, counts=None) -> list[int]:
        """As the base; the i-th placeholder becomes counts[i] image ids, or one (a slot for `_widen`) without."""
        ids = []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids += [self.image_token_id] * (1 if counts is None else counts[i - 1])
            if chunk or (i == 0 and add_special_tokens):
                ids += self.tokenizer(chunk, add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        return ids

    def _widen(self, ids: list[int], counts: list[int]) -> list[int]:
        """One image id per placeholder -> counts[i] ids for the i-th."""
        out, seen = [], 0
        for token in ids:
            if token == self.image_token_id:
                out += [token] * counts[seen]
                seen += 1
            else:
                out.append(token)
        return out

    def _images(self, images, hd_num) -> tuple:
        """One sample's images -> (features, image ids per image)."""
        features = self.image_processor(images, hd_num=hd_num, return_tensors="pt")
        counts = [self.image_processor.num_image_tokens(r, c) for r, c in features["image_grid"].tolist()]
        return features, counts

    def _merge(self, data: dict, features: list, return_tensors) -> BatchFeature:
        if features:
            for key in ("pixel_values", "image_grid"):
                value = torch.cat([f[key] for f in features])
                data[key] = value.numpy() if return_tensors == "np" else value
        return BatchFeature(data)

    def __call__(self, text: str | list[str] | None = None, images=None, hd_num: int | None = None,
                 padding: bool | str = True, max_length: int | None = None, return_tensors: str | None = "pt",
                 add_special_tokens: bool = True, videos=None, audio=None, **kwargs) -> BatchFeature:
        """As XComposerProcessor.__call__, plus `hd_num`; images are given per sample (a list of lists) or flat, in
        placeholder order."""
        _check_call(text, images, videos, audio, kwargs)
        if text is None:
            return self.image_processor(_flatten_images(images), hd_num=hd_num,
                                        return_tensors="pt" if return_tensors is None else return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = _split_images(images, len(texts))
        if per_sample is None and images is not None and not any(self.image_token in t for t in texts):
            per_sample = [_flatten_images(images)] if len(texts) == 1 else None
        if per_sample is not None:  # a bare question in a user turn, as upstream 2.5's chat builds it
            texts = [self._render([{"role": "user", "content": t}], add_generation_prompt=True)
                     if ims and self._is_question(t) else t for t, ims in zip(texts, per_sample)]
            texts = [t if self.image_token in t else self.image_token * len(ims) + t
                     for t, ims in zip(texts, per_sample)]
        else:
            per_sample = self._deal(_flatten_images(images), [t.count(self.image_token) for t in texts])
        max_length = self.max_length if max_length is None else max_length
        batch_ids, features = [], []
        for index, (sample, sample_images) in enumerate(zip(texts, per_sample)):
            chunks = sample.split(self.image_token)
            if len(sample_images) != len(chunks) - 1:
                raise ValueError(f"sample {index} has {len(chunks) - 1} {self.image_token} placeholders but "
                                 f"{len(sample_images)} images were given for it")
            self._check_length(index, sample, None, max_length)
            self._check_text(sample)
            counts = []
            if sample_images:
                sample_features, counts = self._images(sample_images, hd_num)
                features.append(sample_features)
            ids = self._expand(chunks, add_special_tokens, counts)
            self._check_length(index, sample, len(ids), max_length)
            batch_ids.append(ids)
        return self._merge(self._pad(batch_ids, padding, max_length, return_tensors), features, return_tensors)

    def _deal(self, images: list, placeholders: list[int]) -> list[list]:
        """A flat list of images -> each sample's, in placeholder order."""
        if len(images) != sum(placeholders):
            raise ValueError(f"the text has {sum(placeholders)} {self.image_token} placeholders but {len(images)} "
                             f"images were given")
        starts = np.cumsum([0, *placeholders]).tolist()
        return [images[a:b] for a, b in zip(starts, starts[1:])]

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = "pt",
                            continue_final_message: bool = False, raw_content: bool = False, images=None,
                            processor_kwargs: dict | None = None, **kwargs):
        """As XComposerProcessor.apply_chat_template, plus `hd_num`; a conversation with one image and no
        placeholder gets the image in front of the whole prompt (after BOS), as upstream 2.5's chat builds it."""
        options = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message)
        if not tokenize:
            return super().apply_chat_template(conversation, tokenize=False, **options)
        batch = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batch else [conversation]
        if kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError("return_assistant_tokens_mask is not supported; finetune.py builds answer-only labels")
        processor_kwargs = {**(processor_kwargs or {}), **kwargs}
        max_length = processor_kwargs.pop("max_length", None)
        padding = processor_kwargs.pop("padding", True)
        hd_num = processor_kwargs.pop("hd_num", None)
        if processor_kwargs:
            raise TypeError(f"unexpected arguments {sorted(processor_kwargs)}")
        limit = self.max_length if max_length is None else max_length
        ids = [self.encode_messages(c, raw_content=raw_content, max_length=limit, **options) for c in conversations]
        in_messages = [[_message_image(item) for message in c
                        for item in (message["content"] if isinstance(message["content"], (list, tuple)) else ())
                        if isinstance(item, dict) and item.get("type") == "image"] for c in conversations]
        if any(in_messages) and images:
            raise ValueError("give images either inside the messages or as images=, not both")
        slots = [sample.count(self.image_token_id) for sample in ids]
        nested = None if any(in_messages) else _split_images(images, len(conversations))
        if any(in_messages):
            per_sample = in_messages
        elif nested is not None:
            per_sample = nested
        else:
            flat = _flatten_images(images)
            lead = len(conversations) == 1 and len(flat) == 1 and not slots[0]
            per_sample = [flat] if lead else self._deal(flat, slots)
        batch_ids, features = [], []
        for index, (sample, sample_images) in enumerate(zip(ids, per_sample)):
            if len(sample_images) == 1 and slots[index] == 0:  # 2.5: the only image leads the whole prompt
                bos = sample[:1] if sample and sample[0] == self.tokenizer.bos_token_id else []
                sample = [*bos, self.image_token_id, *sample[len(bos):]]
            elif len(sample_images) != slots[index]:
                raise ValueError(f"the conversation has {slots[index]} {self.image_token} placeholders but "
                                 f"{len(sample_images)} images were given")
            if sample_images:
                sample_features, counts = self._images(sample_images, hd_num)
                features.append(sample_features)
                sample = self._widen(sample, counts)
            if limit is not None and len(sample) > limit:
                raise ValueError(f"prompt too long: sample {index} is {len(sample)} tokens long, more than "
                                 f"max_length={limit}")
            batch_ids.append(sample)
        data = self._merge(self._pad(batch_ids, padding, max_length, return_tensors), features, return_tensors)
        return data if return_dict else data["input_ids"]


XComposerHDImageProcessor.register_for_auto_class("AutoImageProcessor")
XComposerHDProcessor.register_for_auto_class("AutoProcessor")


# Message texts are rendered as these marks, so that after rendering we know where each text lies.
_MARK = re.compile("\x00\ue000([0-9]+)\ue000\x00")


def _mark_texts(messages) -> tuple[list[dict], list[str]]:
    """Messages with each non-empty text replaced by a mark, and the texts (an empty one stays empty, so the
    template can still test it, e.g. for "no system turn")."""
    texts = []

    def mark(text):
        if not isinstance(text, str):
            raise TypeError(f"message text must be a string, got {type(text).__name__}")
        if "\x00\ue000" in text:
            raise ValueError("message text contains the reserved characters U+0000 U+E000")
        if not text:
            return text
        texts.append(text)
        return f"\x00\ue000{len(texts) - 1}\ue000\x00"

    marked = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"a chat message needs 'role' and 'content', got {message!r}")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            content = [{**item, "text": mark(item["text"])} if isinstance(item, dict) and item.get("type") == "text"
                       else item for item in content]
        else:
            content = mark(content)
        marked.append({**message, "content": content})
    return marked, texts


def _occurrences(text: str, strings) -> list[int]:
    """Start positions of non-overlapping occurrences of any of `strings` in `text`, leftmost-longest first."""
    candidates = sorted((s for s in strings if s and s in text), key=len, reverse=True)
    starts, i = [], 0
    while candidates and i < len(text):
        match = next((s for s in candidates if text.startswith(s, i)), None)
        if match is None:
            i += 1
        else:
            starts.append(i)
            i += len(match)
    return starts


def _longest_piece(tokenizer) -> int:
    """The most characters one token can cover (cached on the tokenizer: the vocabulary is large)."""
    cached = tokenizer.__dict__.get("_longest_piece")
    if cached is None:
        cached = tokenizer.__dict__["_longest_piece"] = max(map(len, tokenizer.get_vocab()), default=1)
    return cached


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
