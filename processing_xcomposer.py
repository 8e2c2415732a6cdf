"""Image processor, processor and chat templates for InternLM-XComposer v1 and XComposer2.

Preprocessing follows upstream exactly: an RGB PIL image is resized to a square with PIL bicubic,
divided by 255 and normalized with CLIP's mean/std (torchvision Resize/ToTensor/Normalize on PIL).
The processor expands each `<ImageHere>` into `num_image_tokens` copies of `image_token_id`, llava
style, and tokenizes the text between placeholders separately, BOS only at the start of a sample.
"""

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

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

# v2: `[UNUSED_TOKEN_146]{role}\n{content}[UNUSED_TOKEN_145]\n` per turn; the default system prompt
# when no system message is given (one with empty content means no system turn).
CHAT_TEMPLATE_V2 = _RENDER_CONTENT + (
    "{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 -%}"
    "{{- '[UNUSED_TOKEN_146]system\\n' + DEFAULT_SYSTEM + '[UNUSED_TOKEN_145]\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set content = render(message['content']) -%}"
    "{%- if content -%}{{- '[UNUSED_TOKEN_146]system\\n' + content + '[UNUSED_TOKEN_145]\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- '[UNUSED_TOKEN_146]' + message['role'] + '\\n' + render(message['content']) + '[UNUSED_TOKEN_145]\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[UNUSED_TOKEN_146]assistant\\n' -}}{%- endif -%}"
).replace("DEFAULT_SYSTEM", "'" + DEFAULT_SYSTEM_PROMPT_V2.replace("\n", "\\n") + "'")

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


def load_image(image) -> Image.Image:
    """Any supported input -> RGB PIL image, as upstream's `Image.open(path).convert('RGB')`."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"cannot read image file {str(image)!r}: {err}") from err
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a file path or an HWC numpy array, got {type(image).__name__}")

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # A plain convert('RGB') clips these to 0..255 (a 16-bit image becomes almost all white).
        image = Image.fromarray(_wide_to_uint8(np.asarray(image)))  # mode L
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from err
    return image


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
    """Image processor + tokenizer; expands each `<ImageHere>` into `num_image_tokens` image ids."""

    # How transformers 4.x finds, checks and loads the parts (5.x reads the __init__ signature instead).
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"
    valid_kwargs = ["num_image_tokens", "image_token_id", "image_token", "end_of_turn", "chat_template"]

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
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def for_model(cls, config, tokenizer) -> "XComposerProcessor":
        """The processor that matches a model config: its image size, image tokens and chat format."""
        return cls(
            image_processor=XComposerImageProcessor.for_model(config),
            tokenizer=tokenizer,
            num_image_tokens=config.num_image_tokens,
            image_token_id=config.image_token_id,
            end_of_turn=END_OF_TURN[config.connector],
            chat_template=CHAT_TEMPLATES[config.connector],
        )

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at eos or at the piece that ends a turn."""
        ids = [self.tokenizer.eos_token_id]
        if self.end_of_turn is not None:
            ids.append(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        return ids

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
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if videos is not None or audio is not None:
            raise ValueError("XComposerProcessor takes only text and images")
        if text is None:
            if images is None:
                raise ValueError("give text, images or both")
            return self.image_processor(_flatten_images(images), return_tensors=return_tensors)

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        per_sample = _split_images(images, len(texts))
        batch_ids, placeholders = [], 0
        for index, sample in enumerate(texts):
            chunks = sample.split(self.image_token)
            placeholders += len(chunks) - 1
            if per_sample is not None and len(per_sample[index]) != len(chunks) - 1:
                raise ValueError(
                    f"sample {index} has {len(chunks) - 1} {self.image_token} placeholders but "
                    f"{len(per_sample[index])} images were given for it"
                )
            ids = self._expand(chunks, add_special_tokens)
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"sample {index} is {len(ids)} tokens long, more than max_length={max_length}")
            batch_ids.append(ids)

        flat_images = _flatten_images(images)
        if len(flat_images) != placeholders:
            raise ValueError(
                f"the text has {placeholders} {self.image_token} placeholders but {len(flat_images)} images were given"
            )

        data = self._pad(batch_ids, padding, max_length, return_tensors)
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=return_tensors))
        return BatchFeature(data)

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

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


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
