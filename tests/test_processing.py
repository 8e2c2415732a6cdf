"""XComposerImageProcessor and XComposerProcessor: the upstream preprocessing recipe, placeholder
expansion, padding, chat templates, and a remote-code save/load round trip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from processing_xcomposer import (  # noqa: E402
    CHAT_TEMPLATE_V1,
    CHAT_TEMPLATE_V2,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_SYSTEM_PROMPT_V2,
    XComposerImageProcessor,
    XComposerProcessor,
)
from tiny_sp import tiny_sp_path  # noqa: E402
from tokenization_internlm import InternLMTokenizer  # noqa: E402

NUM_IMAGE_TOKENS = 5
IMAGE_SIZE = 14


def make_tokenizer(version=2):
    return InternLMTokenizer(tiny_sp_path(version))


def make_processor(version=2, image_size=IMAGE_SIZE):
    tokenizer = make_tokenizer(version)
    return XComposerProcessor(
        image_processor=XComposerImageProcessor(image_size=image_size),
        tokenizer=tokenizer,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_token_id=len(tokenizer),  # one past the vocabulary, like upstream v1's extra tokens
        chat_template=CHAT_TEMPLATE_V2 if version == 2 else CHAT_TEMPLATE_V1,
    )


def random_rgb(width=11, height=7, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def upstream_pixels(rgb: Image.Image, size: int) -> np.ndarray:
    """The upstream recipe computed directly: PIL bicubic resize, /255 (ToTensor), (x - mean) / std."""
    array = np.asarray(rgb.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32)
    array = array / np.float32(255)
    array = (array - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return array.transpose(2, 0, 1)


def to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalization: back to ToTensor's 0..1 range."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return pixel_values * std + mean


# ---------------------------------------------------------------- image processor


@pytest.mark.parametrize("size", [4, 14, 23])  # downscale, mixed, upscale of an 11x7 image
def test_pixel_values_equal_the_upstream_recipe_exactly(size):
    image = random_rgb()
    out = XComposerImageProcessor(image_size=size)(image)["pixel_values"]
    assert out.dtype == torch.float32 and out.shape == (1, 3, size, size)
    assert torch.equal(out[0], torch.from_numpy(upstream_pixels(image, size)))
    # The same thing written with torch ops, as torchvision's ToTensor + Normalize do it.
    resized = torch.from_numpy(np.asarray(image.resize((size, size), Image.BICUBIC)).copy())
    tensor = resized.permute(2, 0, 1).float().div(255)
    tensor = tensor.sub(torch.tensor(CLIP_MEAN).view(3, 1, 1)).div(torch.tensor(CLIP_STD).view(3, 1, 1))
    assert torch.equal(out[0], tensor)


def test_default_sizes_and_clip_statistics():
    processor = XComposerImageProcessor()
    assert processor.image_size == 490
    assert processor.image_mean == list(CLIP_MEAN) and processor.image_std == list(CLIP_STD)
    out = XComposerImageProcessor(image_size=224)([random_rgb(), random_rgb(seed=1)])["pixel_values"]
    assert out.shape == (2, 3, 224, 224)


def test_numpy_array_and_file_path_give_the_same_pixels_as_pil(tmp_path):
    image = random_rgb(width=30, height=9)
    path = tmp_path / "image.png"
    image.save(path)
    processor = XComposerImageProcessor(image_size=IMAGE_SIZE)
    expected = processor(image)["pixel_values"]
    for source in (np.asarray(image), str(path), path):
        assert torch.equal(processor(source)["pixel_values"], expected)


def _gradient(width=40, height=24):
    return np.linspace(0.0, 1.0, width * height).reshape(height, width)


def _images_of_every_mode():
    rgb = random_rgb(width=40, height=24)
    unit = _gradient()
    return {
        "RGBA": rgb.convert("RGBA"),
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "L": rgb.convert("L"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(np.rint(unit * 65535).astype(np.uint16)),
        "I": Image.fromarray(np.rint(unit * 65535).astype(np.int32)),
        "F": Image.fromarray(unit.astype(np.float32)),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "F"])
def test_every_pil_mode_gives_finite_pixels_of_the_right_shape(mode):
    image = _images_of_every_mode()[mode]
    assert image.mode == mode
    out = XComposerImageProcessor(image_size=IMAGE_SIZE)(image)["pixel_values"]
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK"])
def test_modes_with_alpha_or_palette_follow_upstreams_convert_rgb(mode):
    image = _images_of_every_mode()[mode]
    out = XComposerImageProcessor(image_size=IMAGE_SIZE)(image)["pixel_values"][0]
    assert torch.equal(out, torch.from_numpy(upstream_pixels(image.convert("RGB"), IMAGE_SIZE)))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_gradient_is_scaled_not_saturated(mode):
    image = _images_of_every_mode()[mode]
    unit = to_unit_range(XComposerImageProcessor(image_size=IMAGE_SIZE)(image)["pixel_values"])
    saturated = (unit > 0.99).float().mean().item()
    assert saturated < 0.1, f"{saturated:.0%} of a full-range {mode} gradient is white"
    # The gradient survives: dark on the top left, bright on the bottom right, grey channels equal.
    assert unit[0, :, 0, 0].max() < 0.1 and unit[0, :, -1, -1].min() > 0.9
    torch.testing.assert_close(unit[0, 0], unit[0, 2], atol=1e-5, rtol=0)


def test_sixteen_bit_image_matches_its_eight_bit_version():
    unit = _gradient()
    wide = Image.fromarray(np.rint(unit * 65535).astype(np.uint16))
    narrow = Image.fromarray(np.rint(unit * 255).astype(np.uint8))
    processor = XComposerImageProcessor(image_size=IMAGE_SIZE)
    assert torch.equal(processor(wide)["pixel_values"], processor(narrow)["pixel_values"])


def test_unreadable_or_missing_file_error_names_the_path(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not an image")
    processor = XComposerImageProcessor(image_size=IMAGE_SIZE)
    for path in (broken, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=str(path.name)) as info:
            processor(str(path))
        assert str(path) in str(info.value)


# ---------------------------------------------------------------- processor: text and images


def test_placeholder_expands_to_image_ids_with_a_single_bos():
    processor = make_processor()
    tok = processor.tokenizer
    out = processor("red circle<ImageHere>blue star", images=[random_rgb()])
    ids = out["input_ids"][0].tolist()
    before = tok("red circle", add_special_tokens=False)["input_ids"]
    after = tok("blue star", add_special_tokens=False)["input_ids"]
    image_id = processor.image_token_id
    assert ids == [tok.bos_token_id] + before + [image_id] * NUM_IMAGE_TOKENS + after
    assert ids.count(tok.bos_token_id) == 1
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["input_ids"].dtype == torch.long
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_sample_starting_with_an_image_keeps_bos_first_and_runs_stay_separate():
    processor = make_processor()
    tok, image_id = processor.tokenizer, processor.image_token_id
    ids = processor("<ImageHere><ImageHere>star", images=[random_rgb(), random_rgb(seed=1)])["input_ids"][0]
    ids = ids.tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1 : 1 + 2 * NUM_IMAGE_TOKENS] == [image_id] * (2 * NUM_IMAGE_TOKENS)
    assert ids[1 + 2 * NUM_IMAGE_TOKENS :] == tok("star", add_special_tokens=False)["input_ids"]


def test_the_placeholder_string_is_never_tokenized():
    processor = make_processor()
    ids = processor("a<ImageHere>b", images=[random_rgb()])["input_ids"][0].tolist()
    placeholder_ids = processor.tokenizer.sp_model.encode("<ImageHere>")  # its text as sentencepiece pieces
    assert len(ids) == 1 + 1 + NUM_IMAGE_TOKENS + 1
    assert not any(ids[i : i + len(placeholder_ids)] == placeholder_ids for i in range(len(ids)))


def test_images_flat_or_per_sample_give_the_same_batch():
    processor = make_processor()
    images = [random_rgb(seed=s) for s in range(3)]
    texts = ["<ImageHere>red", "blue<ImageHere>green<ImageHere>"]
    flat = processor(texts, images=images)
    nested = processor(texts, images=[images[:1], images[1:]])
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(flat[key], nested[key])
    expected = XComposerImageProcessor(image_size=IMAGE_SIZE)(images)["pixel_values"]
    assert torch.equal(flat["pixel_values"], expected)


def test_image_count_mismatch_names_both_counts():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"2 <ImageHere> placeholders but 1 images"):
        processor("a<ImageHere>b<ImageHere>", images=[random_rgb()])
    with pytest.raises(ValueError, match=r"0 <ImageHere> placeholders but 2 images"):  # which image goes where?
        processor(["no image here", "nor here"], images=[random_rgb(), random_rgb()])
    with pytest.raises(ValueError, match=r"1 <ImageHere> placeholders but 0 images"):
        processor("one<ImageHere>")


def test_a_text_without_placeholders_given_images_is_a_question_in_a_user_turn():
    processor = make_processor()
    images = [random_rgb(), random_rgb(seed=1)]
    placed = processor("Compare them.", images=images)
    messages = [{"role": "user", "content": "<ImageHere><ImageHere>Compare them."}]
    turn = processor.apply_chat_template(messages, images=images, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)
    assert torch.equal(placed["input_ids"], turn["input_ids"])  # as model.chat builds it
    assert torch.equal(placed["pixel_values"], turn["pixel_values"])
    raw = processor("<ImageHere><ImageHere>Compare them.", images=images)  # with placeholders: a raw prompt
    assert raw["input_ids"].shape[1] < placed["input_ids"].shape[1]


def test_per_sample_image_count_mismatch_names_the_sample():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"sample 1 has 1 <ImageHere> placeholders but 2 images"):
        processor(["<ImageHere>a", "<ImageHere>b"], images=[[random_rgb()], [random_rgb(), random_rgb()]])


def test_too_long_sample_raises_with_its_index_and_length_instead_of_truncating():
    processor = make_processor()
    length = len(processor("red<ImageHere>", images=[random_rgb()])["input_ids"][0])
    out = processor(["red", "red<ImageHere>"], images=[random_rgb()], max_length=length)
    assert out["input_ids"].shape == (2, length)
    with pytest.raises(ValueError, match=rf"sample 1 is {length} tokens long, more than max_length={length - 1}"):
        processor(["red", "red<ImageHere>"], images=[random_rgb()], max_length=length - 1)


def test_batches_are_left_padded_with_the_pad_id():
    processor = make_processor()
    tok = processor.tokenizer
    texts = ["red", "There is a blue star<ImageHere> on the left of the image."]
    images = [random_rgb()]
    batch = processor(texts, images=images)
    short = processor(texts[0])["input_ids"][0].tolist()
    long = processor(texts[1], images=images)["input_ids"][0].tolist()
    pad = len(long) - len(short)
    assert pad > 0 and tok.pad_token_id == 2
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * pad + short
    assert batch["input_ids"][1].tolist() == long
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]


def test_padding_to_max_length_and_lists_without_tensors():
    processor = make_processor()
    out = processor(["red", "blue star"], padding="max_length", max_length=12)
    assert out["input_ids"].shape == (2, 12) and out["attention_mask"][:, :2].sum() == 0
    lists = processor(["red", "blue star"], padding=False, return_tensors=None)
    assert isinstance(lists["input_ids"], list)
    assert len(lists["input_ids"][0]) != len(lists["input_ids"][1])


def test_decode_passthroughs():
    processor = make_processor()
    ids = processor(["red circle", "blue"], padding=False, return_tensors=None)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["red circle", "blue"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "red circle"


# ---------------------------------------------------------------- chat templates

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "And its position?"},
]
SYSTEM = {"role": "system", "content": "Answer briefly."}

V2_TURNS = (
    "[UNUSED_TOKEN_146]user\n<ImageHere>What is this?[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]assistant\nA red circle.[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]user\nAnd its position?[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]assistant\n"
)
V1_TURNS = (
    " <|User|>:<ImageHere>What is this?\n<TOKENS_UNUSED_0> <|Bot|>:A red circle.<TOKENS_UNUSED_1>\n"
    " <|User|>:And its position?\n<TOKENS_UNUSED_0> <|Bot|>:"
)


def test_default_system_prompt_is_upstreams_meta_instruction():
    assert DEFAULT_SYSTEM_PROMPT_V2 == (
        "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
        "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
        "user such as English and 中文.\n"
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively "
        "based on the provided image."
    )


@pytest.mark.parametrize(
    "system, expected_prefix",
    [
        (None, f"[UNUSED_TOKEN_146]system\n{DEFAULT_SYSTEM_PROMPT_V2}[UNUSED_TOKEN_145]\n"),
        (SYSTEM, "[UNUSED_TOKEN_146]system\nAnswer briefly.[UNUSED_TOKEN_145]\n"),
        ({"role": "system", "content": ""}, ""),
    ],
    ids=["default-system", "given-system", "empty-system"],
)
def test_v2_chat_template_renders_upstreams_format(system, expected_prefix):
    messages = ([system] if system else []) + CONVERSATION
    text = make_processor(2).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected_prefix + V2_TURNS


def test_v2_generation_prompt_is_optional():
    text = make_processor(2).apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert text.endswith("[UNUSED_TOKEN_146]assistant\nA red circle.[UNUSED_TOKEN_145]\n")


@pytest.mark.parametrize("system, expected_prefix", [(None, ""), (SYSTEM, "Answer briefly.\n")])
def test_v1_chat_template_renders_upstreams_format(system, expected_prefix):
    messages = ([system] if system else []) + CONVERSATION
    processor = make_processor(1)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected_prefix + V1_TURNS
    # The bot prompt is part of the user turn, so the generation prompt adds nothing.
    assert processor.apply_chat_template(messages, tokenize=False) == text


@pytest.mark.parametrize("version", [1, 2])
def test_chat_template_tokenized_with_images_expands_the_placeholder(version):
    processor = make_processor(version)
    image = random_rgb()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    direct = processor(text, images=[image])
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert (out["input_ids"] == processor.image_token_id).sum() == NUM_IMAGE_TOKENS


# ---------------------------------------------------------------- save / load as remote code

LOAD_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

folder, image_folder, result = sys.argv[1], sys.argv[2], sys.argv[3]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(image_folder, trust_remote_code=True)
spec = json.load(open(folder + "/inputs.json"))
images = [Image.open(folder + "/" + name) for name in spec["images"]]
out = processor(spec["texts"], images=images)
torch.save(
    {
        "classes": [type(processor).__module__, type(processor.image_processor).__module__,
                    type(processor.tokenizer).__module__, type(image_processor).__module__],
        "input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
        "pixel_values": out["pixel_values"], "alone": image_processor(images)["pixel_values"],
        "chat": processor.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False),
        "template": processor.chat_template,
        "settings": [processor.num_image_tokens, processor.image_token_id, processor.image_token],
    },
    result,
)
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_save_then_autoprocessor_in_a_fresh_offline_process_gives_identical_outputs(tmp_path, version):
    processor = make_processor(version, image_size=28)
    folder, image_folder = tmp_path / "checkpoint", tmp_path / "image_processor_only"
    processor.save_pretrained(folder)
    XComposerImageProcessor(image_size=21).save_pretrained(image_folder)
    for name in ("processing_xcomposer.py", "tokenization_internlm.py"):
        shutil.copy(REPO / name, folder / name)
    shutil.copy(REPO / "processing_xcomposer.py", image_folder)

    # The auto_map entries point at the copied modules.
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_xcomposer.XComposerProcessor"
    # 5.x nests the image processor in processor_config.json; 4.x writes preprocessor_config.json
    image_config = processor_config.get("image_processor") or json.loads((folder / "preprocessor_config.json").read_text())
    assert image_config["auto_map"]["AutoImageProcessor"] == "processing_xcomposer.XComposerImageProcessor"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm.InternLMTokenizer"
    # chat_template.jinja since 4.52, chat_template.json before
    saved = folder / "chat_template.jinja"
    template = saved.read_text() if saved.exists() else json.loads((folder / "chat_template.json").read_text())["chat_template"]
    assert template == processor.chat_template
    preprocessor_config = json.loads((image_folder / "preprocessor_config.json").read_text())
    assert preprocessor_config["auto_map"]["AutoImageProcessor"] == "processing_xcomposer.XComposerImageProcessor"

    images = {"a.png": random_rgb(), "b.png": random_rgb(width=5, height=17, seed=3).convert("P")}
    for name, image in images.items():
        image.save(folder / name)
    spec = {
        "texts": ["red<ImageHere>circle", "<ImageHere>There is a blue star<ImageHere>"],
        "images": ["a.png", "b.png", "a.png"],
        "messages": [SYSTEM] + CONVERSATION,
    }
    (folder / "inputs.json").write_text(json.dumps(spec))
    loaded_images = [Image.open(folder / name) for name in spec["images"]]
    expected = processor(spec["texts"], images=loaded_images)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_OFFLINE="1")
    result = tmp_path / "result.pt"
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(folder), str(image_folder), str(result)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(result)

    assert all(module.startswith("transformers_modules.") for module in got["classes"]), got["classes"]
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(got[key], expected[key]), key
    assert got["pixel_values"].shape == (3, 3, 28, 28)
    assert got["alone"].shape == (3, 3, 21, 21)
    assert got["template"] == processor.chat_template
    assert got["chat"] == processor.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
    assert got["settings"] == [NUM_IMAGE_TOKENS, processor.image_token_id, "<ImageHere>"]
