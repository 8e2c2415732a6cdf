"""The embedded default model (default_model/, trained by `python tiny_synthetic.py --output_dir default_model
--link_code`) loads as users load any checkpoint and answers questions about freshly drawn pictures."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoProcessor

import tiny_synthetic
from model_folder import CODE_FILES, check_model_folder

FOLDER = os.path.join(ROOT, "default_model")


@pytest.fixture(scope="module")
def default_model():
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)


def test_default_model_answers_fresh_pictures(default_model):
    model, processor = default_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding many tiny steps: one thread is the faster
    try:
        result = tiny_synthetic.evaluate(model, processor, 200, seed=2024, image_size=56)
    finally:
        torch.set_num_threads(threads)
    accuracy = result["accuracy"]
    assert set(accuracy) == {"colour", "shape", "count", "relation", "compare", "overall"}
    for kind in ("colour", "shape", "count", "relation", "compare"):
        assert accuracy[kind] >= 0.85, (kind, accuracy)  # the per-kind bar
    assert accuracy["overall"] >= 0.95, accuracy


@pytest.mark.slow
def test_demo_runs_and_prints_answers(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--seed", "5", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("XComposer2:") == 5 and (tmp_path / "demo_compare_1.png").exists()


def test_default_model_folder_links_the_code_and_is_complete():
    assert check_model_folder(FOLDER) == []
    for name in CODE_FILES:  # links, so the shipped model always loads with the repository's code
        path = os.path.join(FOLDER, name)
        assert os.path.islink(path) and os.readlink(path) == os.path.join("..", name), name
    assert not os.path.lexists(os.path.join(FOLDER, "model_folder.py"))  # writer-side, not remote code
    assert os.path.isfile(os.path.join(FOLDER, "preprocessor_config.json"))  # transformers 4.x reads this one
    with open(os.path.join(FOLDER, "processor_config.json")) as f:
        assert json.load(f)["end_of_turn"] == "[UNUSED_TOKEN_145]"
