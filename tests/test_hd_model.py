"""XComposer-2.5 / 4KHD end to end: a tiny checkpoint in the upstream 2.5 layout, converted by
convert_checkpoint.py, gives the logits and greedy tokens of the independent reference
(tests/upstream_reference_hd.py) for a wide, a tall and a small image, two images with text between them, and
text alone; a left-padded batch of differently sized images equals single runs; the separators, Partial LoRA,
the tile order and dynamic NTK scaling all visibly matter; chat builds 2.5's prompt; save/load keeps it all."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from tiny_sp import tiny_sp_path
from upstream_reference import write_upstream_checkpoint
from upstream_reference_hd import (chat_prompt_2d5, hd_greedy, hd_logits, hd_num_tokens, hd_preprocess, hd_prompt_rows,
                                   make_upstream_hd_state_dict, tiny_upstream_hd_config)

import convert_checkpoint
from modeling_xcomposer import XComposerForCausalLM
from processing_xcomposer import XComposerHDProcessor
from transformers_compat import DTYPE_ARG

TILE, ATOL = 56, 1e-5
SYSTEM = "You are a careful assistant."


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    """(upstream config, state dict, converted folder, model, processor)."""
    root = tmp_path_factory.mktemp("hd")
    config = tiny_upstream_hd_config()
    sd = make_upstream_hd_state_dict(config, seed=3, tile=TILE, video_mem=True)
    write_upstream_checkpoint(root / "upstream", config, sd, tokenizer_model_path=tiny_sp_path(2))
    assert convert_checkpoint.main([str(root / "upstream"), str(root / "ours")]) == 0
    model = XComposerForCausalLM.from_pretrained(root / "ours", **{DTYPE_ARG: torch.float32}).eval()
    processor = XComposerHDProcessor.from_pretrained(root / "ours", trust_remote_code=True)
    return config, sd, root / "ours", model, processor


def reference(hd, prompt, images, hd_num, sd=None, **kwargs):
    config, original, _, _, processor = hd
    tokenizer = processor.tokenizer

    def tokenize(text, bos):
        return tokenizer(text, add_special_tokens=bos)["input_ids"]
    tensors = [hd_preprocess(image, hd_num, TILE, "bottom", True) for image in images]
    return hd_prompt_rows(config, sd or original, tokenize, prompt, tensors, TILE, **kwargs)


def ours(hd, messages=None, images=(), prompt=None, **kwargs):
    _, _, _, model, processor = hd
    if prompt is not None:
        inputs = processor(text=prompt, images=list(images) or None, **kwargs)
    else:
        inputs = processor.apply_chat_template(messages, images=list(images), add_generation_prompt=True,
                                               tokenize=True, return_dict=True, **kwargs)
    with torch.no_grad():
        return inputs, model(**inputs).logits[0]


CASES = {  # (messages, images, the 2.5 prompt the reference builds, hd_num upstream uses)
    "wide": ([{"role": "user", "content": "What is in this picture?"}], [noise(130, 50, 1)],
             chat_prompt_2d5("What is in this picture?", 1), 24),
    "tall+system": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Describe it."}],
                    [noise(40, 130, 2)], chat_prompt_2d5("Describe it.", 1, meta=SYSTEM), 24),
    "small": ([{"role": "user", "content": "Colour?"}], [noise(20, 15, 3)], chat_prompt_2d5("Colour?", 1), 24),
    "two interleaved": ([{"role": "user", "content": "Left <ImageHere> and right <ImageHere>: same?"}],
                        [noise(300, 100, 4), noise(60, 90, 5)],
                        chat_prompt_2d5("Left <ImageHere> and right <ImageHere>: same?", 2), 6),
    "text only": ([{"role": "user", "content": "Tell me about circles."}], [],
                  chat_prompt_2d5("Tell me about circles.", 0), 24),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_model_matches_the_reference(hd, case):
    messages, images, prompt, hd_num = CASES[case]
    inputs, logits = ours(hd, messages, images)
    rows, mask, text_ids = reference(hd, prompt, images, hd_num)
    ids = inputs["input_ids"][0]
    image_id = hd[3].config.image_token_id
    assert torch.equal(ids == image_id, mask)  # every image position, separators included, and nothing else
    assert ids[~mask].tolist() == text_ids
    torch.testing.assert_close(logits, hd_logits(hd[0], hd[1], rows, mask), rtol=0, atol=ATOL)
    generated = hd[3].generate(**inputs, max_new_tokens=5, do_sample=False)[0, ids.shape[0]:].tolist()
    assert generated == hd_greedy(hd[0], hd[1], rows, mask, 5)


def test_raw_prompts_with_hd_num_match_the_reference(hd):
    prompt = "Look: <ImageHere> now<ImageHere>"
    images = [noise(200, 60, 6), noise(60, 61, 7)]
    inputs, logits = ours(hd, images=images, prompt=prompt, hd_num=3)
    rows, mask, _ = reference(hd, prompt, images, 3)
    torch.testing.assert_close(logits, hd_logits(hd[0], hd[1], rows, mask), rtol=0, atol=ATOL)


def test_a_left_padded_batch_of_different_sizes_equals_single_runs(hd):
    _, _, _, model, processor = hd
    texts = ["<ImageHere>Describe.", "Two: <ImageHere><ImageHere> which?", "Just text, a bit longer than the rest."]
    images = [[noise(130, 50, 8)], [noise(40, 130, 9), noise(20, 15, 10)], []]
    batch = processor(text=texts, images=images)
    with torch.no_grad():
        logits = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, (text, sample) in enumerate(zip(texts, images)):
        single = processor(text=text, images=sample or None)
        n = single["input_ids"].shape[1]
        with torch.no_grad():
            alone = model(**single).logits[0]
        torch.testing.assert_close(logits[row, -n:], alone, rtol=0, atol=1e-5)
        assert generated[row].tolist() == model.generate(**single, max_new_tokens=4, do_sample=False)[0, n:].tolist()


def test_separators_partial_lora_and_tile_order_all_change_the_logits(hd):
    config, sd, _, model, processor = hd
    messages, images, prompt, hd_num = CASES["two interleaved"]
    inputs, base = ours(hd, messages, images)
    rows, mask, _ = reference(hd, prompt, images, hd_num)
    for key in ("plora_glb_GN", "plora_sub_GN", "model.layers.0.attention.wqkv.Plora_B.weight"):
        changed = dict(sd, **{key: torch.zeros_like(sd[key])})
        rows_changed, _, _ = reference(hd, prompt, images, hd_num, sd=changed)
        gap = (hd_logits(config, changed, rows_changed, mask) - base).abs().max()
        assert gap > 1e-2, key  # far beyond the tolerance the parity tests use
    zero_sub = dict(sd, plora_sub_GN=torch.zeros_like(sd["plora_sub_GN"]))
    with torch.no_grad():
        saved = model.model.tile_layout.sub_GN.clone()
        model.model.tile_layout.sub_GN.zero_()
        try:
            zeroed = model(**inputs).logits[0]
        finally:
            model.model.tile_layout.sub_GN.copy_(saved)
    rows_zero, _, _ = reference(hd, prompt, images, hd_num, sd=zero_sub)
    torch.testing.assert_close(zeroed, hd_logits(config, zero_sub, rows_zero, mask), rtol=0, atol=ATOL)
    # the tiles of each image in reverse order: the model sees it, and agrees with the reference doing the same
    pixels, start = inputs["pixel_values"].clone(), 0
    for rows_, cols_ in inputs["image_grid"].tolist():
        assert rows_ * cols_ > 1
        pixels[start + 1:start + 1 + rows_ * cols_] = pixels[start + 1:start + 1 + rows_ * cols_].flip(0)
        start += 1 + rows_ * cols_
    with torch.no_grad():
        reversed_logits = model(**{**inputs, "pixel_values": pixels}).logits[0]
    assert (reversed_logits - base).abs().max() > 1e-2
    rows_rev, _, _ = reference(hd, prompt, images, hd_num, reverse_tiles=True)
    torch.testing.assert_close(reversed_logits, hd_logits(config, sd, rows_rev, mask), rtol=0, atol=ATOL)


def test_dynamic_ntk_rotates_past_max_position_embeddings_as_upstream(hd):
    config, sd, _, model, processor = hd
    limit = config["max_position_embeddings"]
    query = "Describe the picture in detail, please, with every colour and every shape you can see there."
    messages, images = [{"role": "user", "content": query}], [noise(300, 100, 11)]
    inputs, logits = ours(hd, messages, images)
    length = inputs["input_ids"].shape[1]
    assert limit < length < model.config.text_config.max_sequence_length == 2 * limit
    rows, mask, _ = reference(hd, chat_prompt_2d5(query, 1), images, 24)
    torch.testing.assert_close(logits, hd_logits(config, sd, rows, mask), rtol=0, atol=ATOL)
    without = dict(config, rope_scaling=None)
    assert (hd_logits(without, sd, rows, mask) - logits).abs().max() > 1e-3  # the scaling is visible
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, length:].tolist()
    assert generated == hd_greedy(config, sd, rows, mask, 6)  # cached keys keep the rotation they got
    short, _ = ours(hd, [{"role": "user", "content": "Hi"}], [noise(30, 30, 12)])
    assert short["input_ids"].shape[1] < limit  # and a shorter sequence afterwards is not scaled (no state kept)
    rows, mask, _ = reference(hd, chat_prompt_2d5("Hi", 1), [noise(30, 30, 12)], 24)
    torch.testing.assert_close(ours(hd, [{"role": "user", "content": "Hi"}], [noise(30, 30, 12)])[1],
                               hd_logits(config, sd, rows, mask), rtol=0, atol=ATOL)


def test_chat_builds_the_25_prompt_greedy_streams_and_remembers_images(hd):
    config, sd, _, model, processor = hd
    image = noise(130, 50, 13)
    response, history = model.chat(processor, "What is it?", images=image, max_new_tokens=6)
    rows, mask, _ = reference(hd, chat_prompt_2d5("What is it?", 1), [image], 24)
    expected = [t for t in hd_greedy(config, sd, rows, mask, 6, processor.stop_token_ids)
                if t not in processor.stop_token_ids]
    assert response == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert history == [("What is it?", response, [image])]
    # the next turn: the same single image still leads the whole prompt, the first turn is history
    second, history = model.chat(processor, "And the colour?", history=history, max_new_tokens=4)
    prompt = chat_prompt_2d5("And the colour?", 1, history=[("What is it?", response)])
    rows, mask, _ = reference(hd, prompt, [image], 24)
    expected = [t for t in hd_greedy(config, sd, rows, mask, 4, processor.stop_token_ids)
                if t not in processor.stop_token_ids]
    assert second == processor.tokenizer.decode(expected, skip_special_tokens=True)
    # a second image makes each image take its place in its own turn, with hd_num_multi tiles
    other = noise(60, 90, 14)
    third, history = model.chat(processor, "Compare with this one.", images=other, history=history, max_new_tokens=3)
    prompt = chat_prompt_2d5("<ImageHere>Compare with this one.", 2,
                             history=[("<ImageHere>What is it?", response), ("And the colour?", second)])
    rows, mask, _ = reference(hd, prompt, [image, other], 6)
    expected = [t for t in hd_greedy(config, sd, rows, mask, 3, processor.stop_token_ids)
                if t not in processor.stop_token_ids]
    assert third == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert [turn[2] for turn in history] == [[image], [], [other]]
    streamed = []

    class Streamer:
        def put(self, value):
            streamed.append(value)

        def end(self):
            streamed.append(None)
    model.chat(processor, "What is it?", images=image, max_new_tokens=3, streamer=Streamer(), system=SYSTEM)
    assert streamed and streamed[-1] is None


def test_saved_folder_reloads_with_identical_outputs(hd, tmp_path):
    _, _, _, model, processor = hd
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["hd_num"], saved["hd_num_multi"], saved["hd_padding"], saved["hd_clamp"]) == (24, 6, "bottom", True)
    assert saved["text_config"]["rope_dynamic_factor"] == 2.0
    again = XComposerForCausalLM.from_pretrained(tmp_path, **{DTYPE_ARG: torch.float32}).eval()
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    messages, images, _, _ = CASES["two interleaved"]
    a = processor.apply_chat_template(messages, images=images, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)
    b = loaded.apply_chat_template(messages, images=images, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "pixel_values", "image_grid"))
    with torch.no_grad():
        assert torch.equal(model(**a).logits, again(**b).logits)


def test_bad_image_inputs_are_named(hd):
    _, _, _, model, processor = hd
    inputs = processor(text="<ImageHere>hi", images=[noise(130, 50)])
    with pytest.raises(ValueError, match="needs image_grid"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_values hold 7 views but image_grid \[\(2, 2\)\] needs 5"):
        model(**{**inputs, "image_grid": torch.tensor([[2, 2]])})
    with pytest.raises(ValueError, match="image tokens but the tile grids"):
        model(input_ids=inputs["input_ids"][:, 2:], pixel_values=inputs["pixel_values"],
              image_grid=inputs["image_grid"])  # one image position short
    with pytest.raises(ValueError, match="no fixed number of image tokens"):
        model.config.num_image_tokens


def test_hd_token_counts_equal_the_formula_in_the_model_inputs(hd):
    _, _, _, model, processor = hd
    for size in ((130, 50), (40, 130), (20, 15), (300, 100), (700, 30)):
        inputs = processor(text="<ImageHere>", images=[noise(*size)])
        rows, cols = inputs["image_grid"][0].tolist()
        assert (inputs["input_ids"] == model.config.image_token_id).sum() == hd_num_tokens(rows, cols, TILE) == (
            model.config.hd_num_image_tokens(rows, cols))
