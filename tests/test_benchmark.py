"""benchmark.py runs and compares like with like: both modes compute the same numbers."""

import json
import math

import torch

import benchmark


def test_upstream_style_mode_computes_the_same_logits_as_ours():
    model = benchmark.build("tiny", torch.device("cpu"), torch.float32)
    input_ids, pixels = benchmark.prompt(model.config, 2, 1, 8, torch.device("cpu"))
    with torch.no_grad():
        with benchmark.mode(model, "ours", "sdpa"):
            ours = model(input_ids=input_ids, pixel_values=pixels).logits
        with benchmark.mode(model, "upstream", "sdpa"):
            assert model.config.text_config._attn_implementation == "eager"
            theirs = model(input_ids=input_ids, pixel_values=pixels, use_cache=False).logits
    assert model.model.language_model.layers[0].attention.wqkv.B.weight.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_benchmark_prints_every_figure_for_both_modes(capsys):
    results = benchmark.main(["--size", "tiny", "--quick", "--batch", "2", "--new-tokens", "3"])
    out = capsys.readouterr().out
    assert "speed-up over upstream-style, text_heavy" in out and out.strip().splitlines()[-1].startswith("{")
    for mode in ("ours", "upstream"):
        for prompt in ("one_image_64_text", "text_heavy", "image_heavy"):
            row = results[f"{mode}/{prompt}"]
            assert set(row) == {"prompt_tokens", "prefill_ms", "ttft_ms", "decode_tok_s", "batch2_decode_tok_s",
                                "peak_memory_gb"}
            assert all(math.isfinite(v) and v > 0 for v in row.values())  # timings: only that they were taken
    # What does not depend on the machine: the prompts' lengths, the memory that holds the weights, the JSON line.
    per_image = 16  # the tiny size's 56 px / 14 px patches
    assert [results[f"ours/{p}"]["prompt_tokens"] for p in ("one_image_64_text", "text_heavy", "image_heavy")] == [
        1 + 64 + per_image, 1 + 64 + per_image, 1 + 16 + 4 * per_image]
    assert results["ours/one_image_64_text"]["peak_memory_gb"] * 2**30 >= results["parameters_b"] * 1e9 * 4
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["ours/text_heavy"] == results["ours/text_heavy"] and printed["size"] == "tiny"


def test_hd_prefill_compares_like_with_like_and_reports_the_grid(capsys):
    model = benchmark.build("tiny", torch.device("cpu"), torch.float32, benchmark.HD_SIZES)
    inputs, facts = benchmark.hd_inputs(model.config, torch.device("cpu"), num_text=8)
    with torch.no_grad():
        with benchmark.mode(model, "ours", "sdpa"):
            ours = model(**inputs).logits
        with benchmark.mode(model, "upstream", "sdpa"):
            theirs = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    results = benchmark.main(["--hd", "--size", "tiny", "--quick"])
    rows, cols = results["grid"]
    assert results["grid"] == facts["grid"] and rows * cols <= 24
    assert results["prompt_tokens"] == 1 + model.config.hd_num_image_tokens(rows, cols) + 64
    assert all(math.isfinite(results[k]) and results[k] > 0 for k in ("ours/prefill_ms", "upstream/prefill_ms"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["grid"] == [rows, cols]
