"""XComposer-2.5 / 4KHD preprocessing: tile grids and image-token counts follow the rule for every kind of image
size, pixels equal the independent reference (tests/upstream_reference_hd.py), and the processor expands each
placeholder into exactly its image's run, in prompts with several images and in left-padded batches."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sp import tiny_sp_path
from upstream_reference_hd import hd_geometry, hd_num_tokens, hd_preprocess, hd_views

from configuration_xcomposer import XComposerConfig, hd_image_tokens
from processing_xcomposer import XComposerHDImageProcessor, XComposerHDProcessor, XComposerProcessor
from tokenization_internlm import InternLMTokenizer

TILE = 56  # patch 14: a 4 x 4 patch grid, merged to 2 x 2, so the merge and the separators are not trivial
RULES = {"2.5": dict(padding="bottom", clamp=True), "4khd": dict(padding="center", clamp=False)}
SIZES = [(100, 40), (40, 100), (20, 15), (15, 20), (56, 56), (57, 56), (56, 57), (999, 1000), (1000, 999),
         (500, 20), (20, 500), (3, 900), (900, 3), (112, 56), (300, 100), (170, 169), (1, 1)]


def noise(width, height, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def image_processor(rules="2.5", hd_num=6, hd_num_multi=2):
    return XComposerHDImageProcessor(tile_size=TILE, patch_size=14, hd_num=hd_num, hd_num_multi=hd_num_multi,
                                     **RULES[rules])


def processor(hd_num=6, hd_num_multi=2, rules="2.5"):
    tokenizer = InternLMTokenizer(tiny_sp_path(2))
    return XComposerHDProcessor(image_processor=image_processor(rules, hd_num, hd_num_multi), tokenizer=tokenizer,
                                image_token_id=len(tokenizer), end_of_turn="[UNUSED_TOKEN_145]")


@pytest.mark.parametrize("rules", sorted(RULES))
@pytest.mark.parametrize("hd_num", [1, 2, 6, 24])
def test_tile_grid_and_token_count_follow_the_rule(rules, hd_num):
    ours = image_processor(rules)
    for width, height in SIZES:
        expected = hd_geometry(width, height, hd_num, TILE, RULES[rules]["clamp"])
        if 0 in expected:  # the short side would be resized to 0 px (upstream's resize fails): a clear error
            with pytest.raises(ValueError, match="too elongated"):
                ours.layout(width, height, hd_num)
            continue
        grid = ours.layout(width, height, hd_num)["grid"]
        assert grid == expected, (width, height)
        assert ours.num_image_tokens(*grid) == hd_num_tokens(*grid, TILE)
        assert grid[0] * grid[1] <= hd_num


def test_full_size_counts_by_hand():
    """Worked by hand from the rule: a 1920 x 1080 photo in XComposer-2.5 at hd_num 24 has scale 6, clamped to
    ceil(1920 / 560) = 4 columns, 2240 x 1260 -> 3 rows; 13 views of 400 tokens, 1 + 4 * 20 separators."""
    ixc = XComposerHDImageProcessor.for_model(XComposerConfig.from_preset("xcomposer2d5-7b"))
    assert ixc.layout(1920, 1080, 24)["grid"] == (3, 4)
    assert ixc.num_image_tokens(3, 4) == 5281 == hd_image_tokens(3, 4, 20)
    assert ixc.layout(1080, 1920, 24)["grid"] == (4, 3)  # the same photo upright: transposed, padded on the right
    assert ixc.layout(300, 200, 24)["grid"] == (1, 1)  # smaller than a tile: one tile, 841 tokens
    assert ixc.num_image_tokens(1, 1) == 841
    khd = XComposerHDImageProcessor.for_model(XComposerConfig.from_preset("xcomposer2-4khd-7b"))
    assert khd.layout(300, 200, 25)["grid"] == (4, 6)  # no clamp: scale 6 (6 x 4 = 24 <= 25), 2016 x 1344
    assert khd.num_image_tokens(4, 6) == 25 * 144 + 1 + 5 * 12


@pytest.mark.parametrize("rules", sorted(RULES))
@pytest.mark.parametrize("size", [(130, 50), (37, 101), (20, 15), (300, 100)], ids=str)
def test_pixels_equal_the_reference(rules, size):
    image = noise(*size, seed=size[0])
    features = image_processor(rules, hd_num=6)([image])
    reference = hd_views(hd_preprocess(image, 6, TILE, **RULES[rules]), TILE)
    rows, cols = features["image_grid"][0].tolist()
    assert features["pixel_values"].shape == (1 + rows * cols, 3, TILE, TILE) == reference.shape
    torch.testing.assert_close(features["pixel_values"], reference, rtol=0, atol=1e-6)


def test_padding_is_white_below_or_around_the_image_and_on_the_right_of_a_portrait():
    white = [(1 - m) / s for m, s in zip((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))]
    black = Image.new("RGB", (112, 20), (0, 0, 0))
    for rules, top_rows in (("2.5", 0), ("4khd", 18)):
        tiles = image_processor(rules, hd_num=2)([black])["pixel_values"][1:]  # 2 tiles of 56 x 56, 20 px of image
        column = tiles[0, 0, :, 0]
        assert torch.allclose(column[top_rows:top_rows + 20], torch.tensor(-0.48145466 / 0.26862954))
        assert torch.allclose(torch.cat([column[:top_rows], column[top_rows + 20:]]), torch.tensor(white[0]))
    portrait = image_processor("2.5", hd_num=2)([Image.new("RGB", (20, 112))])["pixel_values"][1]
    assert torch.allclose(portrait[0, 0, 20:], torch.tensor(white[0]))  # padding on the right


def test_each_placeholder_expands_to_its_images_run():
    proc = processor()
    wide, tall = noise(130, 50), noise(40, 130)
    out = proc(text="Compare <ImageHere> and <ImageHere>.", images=[wide, tall])
    ids = out["input_ids"][0].tolist()
    grids = [tuple(g) for g in out["image_grid"].tolist()]
    assert grids == [hd_geometry(130, 50, 2, TILE, True), hd_geometry(40, 130, 2, TILE, True)]  # hd_num_multi
    runs = _runs(ids, proc.image_token_id)
    assert [n for _, n in runs] == [hd_num_tokens(*g, TILE) for g in grids]
    assert ids[0] == proc.tokenizer.bos_token_id and ids.count(proc.tokenizer.bos_token_id) == 1
    assert out["pixel_values"].shape[0] == sum(1 + r * c for r, c in grids)


def test_one_image_without_placeholder_leads_the_whole_prompt_after_bos():
    proc = processor()
    prompt = "[UNUSED_TOKEN_146]user\nWhat is it?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    out = proc(text=prompt, images=[noise(130, 50)])
    ids = out["input_ids"][0].tolist()
    count = hd_num_tokens(*out["image_grid"][0].tolist(), TILE)
    assert out["image_grid"][0].tolist() == list(hd_geometry(130, 50, 6, TILE, True))  # one image: hd_num
    assert ids[:1 + count] == [1] + [proc.image_token_id] * count
    assert ids[1 + count:] == proc.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chat = proc.apply_chat_template([{"role": "user", "content": "What is it?"}], images=[noise(130, 50)],
                                    add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat["input_ids"][0].tolist() == ids


def test_hd_num_overrides_the_budget_and_bad_budgets_are_named():
    proc = processor()
    out = proc(text="<ImageHere>", images=[noise(300, 100)], hd_num=1)
    assert out["image_grid"].tolist() == [[1, 1]]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="hd_num must be a positive integer"):
            proc(text="<ImageHere>", images=[noise(30, 30)], hd_num=bad)
    with pytest.raises(ValueError, match="too elongated"):
        image_processor()([Image.new("RGB", (5000, 1))])
    with pytest.raises(ValueError, match="2 <ImageHere> placeholders but 1 images"):
        proc(text="<ImageHere><ImageHere>", images=[noise(30, 30)])


def test_left_padded_batch_of_different_images_keeps_each_samples_runs_and_views():
    proc = processor()
    images = [[noise(130, 50, 1)], [noise(40, 130, 2), noise(20, 15, 3)], []]
    texts = ["<ImageHere>Describe it.", "<ImageHere> versus <ImageHere>", "No picture here."]
    batch = proc(text=texts, images=images)
    assert batch["image_grid"].shape == (3, 2)
    start = 0
    for row, (text, sample) in enumerate(zip(texts, images)):
        single = proc(text=text, images=sample or None)
        n = single["input_ids"].shape[1]
        assert batch["input_ids"][row, -n:].tolist() == single["input_ids"][0].tolist()
        assert batch["attention_mask"][row].sum() == n
        if sample:
            views = single["pixel_values"].shape[0]
            assert torch.equal(batch["pixel_values"][start:start + views], single["pixel_values"])
            start += views
    assert start == batch["pixel_values"].shape[0]


def test_text_only_has_one_bos_and_no_image_inputs():
    out = processor()(text="Hello there.")
    assert out["input_ids"][0].tolist().count(1) == 1 and "pixel_values" not in out


def test_processor_round_trips_through_save_and_load(tmp_path):
    proc = processor(hd_num=5, hd_num_multi=3, rules="4khd")
    proc.save_pretrained(tmp_path)
    loaded = XComposerHDProcessor.from_pretrained(tmp_path, trust_remote_code=True)  # its tokenizer is remote code
    image = loaded.image_processor
    settings = (image.hd_num, image.hd_num_multi, image.padding, image.clamp, image.tile_size)
    assert settings == (5, 3, "center", False, 56)
    text, images = "<ImageHere>What?", [noise(90, 60)]
    for key in ("input_ids", "pixel_values", "image_grid"):
        assert torch.equal(loaded(text=text, images=images)[key], proc(text=text, images=images)[key])
    assert loaded.chat_template == proc.chat_template and "system" not in loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_for_model_picks_the_hd_pair_for_tiled_configs():
    config = XComposerConfig.from_preset("xcomposer2d5-7b")
    proc = XComposerProcessor.for_model(config, InternLMTokenizer(tiny_sp_path(2)))
    assert isinstance(proc, XComposerHDProcessor) and proc.image_processor.tile_size == 560
    assert (proc.image_processor.hd_num, proc.image_processor.hd_num_multi, proc.image_processor.padding) == (
        24, 6, "bottom")


def _runs(ids, token):
    runs, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - start))
            start = None
    return runs
