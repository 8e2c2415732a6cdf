"""finetune.py --recipe tiny-synthetic: its data order and an end-to-end run at a tiny budget."""

import json
import os
import re

import torch

import finetune


def kind_of(record) -> str:
    question = record["conversations"][0]["value"]
    kinds = {"colour": "What colour", "shape": "What shape", "count": "How many", "relation": "left or right",
             "compare": "Which image"}
    return next(kind for kind, words in kinds.items() if words in question)


def test_records_start_with_the_relation_curriculum_then_cycle_through_the_mix():
    records = finetune.SyntheticRecords(40, seed=3, image_size=56, curriculum=12)
    kinds = [kind_of(records[i]) for i in range(len(records))]
    assert kinds[:12] == ["relation"] * 12
    assert kinds[12:] == [finetune.TRAIN_MIX[i % len(finetune.TRAIN_MIX)] for i in range(12, 40)]
    assert len(records[20]["image"]) == (2 if kinds[20] == "compare" else 1)


def test_recipe_trains_saves_and_reports_held_out_accuracy(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = finetune.run_tiny_synthetic(str(tmp_path), time_budget_s=15, vision_warmup_s=2, eval_samples=10,
                                             train_samples=4000, curriculum_samples=64, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    line = re.search(r"^held-out accuracy: ([0-9.]+) \(n=10\)$", out, re.M)
    assert line and float(line.group(1)) == round(result["accuracy"]["overall"], 3)
    assert sum(result["counts"].values()) == 10 and set(result["counts"]) <= set(finetune.TRAIN_MIX)
    assert "vision warm-up: token accuracy" in out and re.search(r"^step \d+ loss", out, re.M)
    with open(tmp_path / "config.json") as f:
        text_config = json.load(f)["text_config"]
    assert text_config["num_key_value_heads"] == text_config["num_attention_heads"] == 6
    assert {"model.safetensors", "tokenizer.model", "modeling_xcomposer.py", "README.md"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "trainer_state").exists()
