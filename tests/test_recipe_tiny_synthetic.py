"""tiny_synthetic.py: the stream's order as the Trainer reads it, the step schedule, an end-to-end run at a
tiny budget that must learn colour, and the same model from the same seed."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

import tiny_synthetic as ts
from finetune import ChatEncoder, DataCollator
from model_folder import CODE_FILES


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    """The recipe's tokenizer, model and processor, untrained."""
    tokenizer = ts.InternLMTokenizer(vocab_file=ts.train_tokenizer(str(tmp_path_factory.mktemp("tokenizer"))))
    config = ts.model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(ts.END_OF_TURN["mlp2x_gelu"]))
    torch.manual_seed(0)
    return ts.XComposerForCausalLM(config), ts.XComposerProcessor.for_model(config, tokenizer)


def test_stream_starts_with_the_relation_curriculum_then_cycles_through_the_mix(recipe_model):
    _, processor = recipe_model
    stream = ts.SyntheticStream(ChatEncoder(processor, system=""), 40, seed=3, image_size=56, curriculum=12)
    samples = [stream.sample(i) for i in range(40)]
    assert [s["kind"] for s in samples[:12]] == ["relation"] * 12
    assert [s["kind"] for s in samples[12:]] == [ts.TRAIN_MIX[i % len(ts.TRAIN_MIX)] for i in range(12, 40)]
    items = list(stream)
    assert len(items) == 40
    for sample, item in zip(samples, items):  # each item is its sample, encoded: the answer trained, then the end
        trained = [t for t in item["labels"] if t != -100]
        assert processor.tokenizer.decode(trained) == sample["answer"] + processor.end_of_turn
        assert item["pixel_values"].shape == (len(sample["images"]), 3, 56, 56)


def test_the_trainer_reads_the_stream_in_order_with_every_picture(recipe_model, tmp_path):
    model, processor = recipe_model
    recipe = ts.Recipe(output_dir=str(tmp_path / "unused"), steps=4, curriculum_steps=1, batch_size=10,
                       warmup_steps=2)
    trainer = ts.recipe_trainer(model, processor, recipe, str(tmp_path / "trainer"))
    stream = ts.SyntheticStream(ChatEncoder(processor, system=""), 40, recipe.seed, 56, curriculum=10)
    expected = [DataCollator(processor.tokenizer.pad_token_id)(list(stream)[i:i + 10]) for i in range(0, 40, 10)]
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 4
    for batch, want in zip(batches, expected):  # in order: the relation batch first, then the mix
        assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["labels"], want["labels"])
        assert torch.equal(batch["pixel_values"], want["pixel_values"])  # two-image samples keep both pictures
    assert batches[1]["pixel_values"].shape[0] == 11  # one compare question (two pictures) among ten
    factor = trainer.lr_scheduler.lr_lambdas[0]  # linear warm-up, then cosine to 0 at the last step
    assert [factor(step) for step in range(5)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)


@pytest.mark.slow
def test_a_tiny_budget_learns_colour_and_writes_a_complete_folder(tmp_path):
    folder = tmp_path / "model"
    command = [sys.executable, os.path.join(ROOT, "tiny_synthetic.py"), "--output_dir", str(folder),
               "--vision_warmup_steps", "100", "--steps", "150", "--curriculum_steps", "0", "--batch_size", "16",
               "--warmup_steps", "10", "--eval_samples", "10"]
    # The command as users run it (its own threads and OpenMP settings); 45 s on two busy cores.
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^vision warm-up: token accuracy [0-9.]+ after 100 steps of 64", out, re.M)
    assert re.search(r"^step 150/150 loss [0-9.]+ lr ", out, re.M) and "trained 150 steps of 16" in out
    per_kind = dict(re.findall(r"^  (\w+): [0-9.]+ \(n=(\d)\)$", out, re.M))
    assert per_kind == dict.fromkeys(ts.KINDS, "2") and re.search(r"^held-out accuracy: [0-9.]+ \(n=10\)$", out, re.M)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # fresh pictures; measured 1.00 on colour, shape, count and compare at this budget
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        fresh = ts.evaluate(model, processor, 80, seed=777, image_size=56,
                            kinds=("colour", "shape", "count", "compare"))
    finally:
        torch.set_num_threads(threads)
    accuracy = fresh["accuracy"]
    assert fresh["counts"]["colour"] == 20 and accuracy["colour"] >= 0.8, accuracy  # chance: 0.25
    assert accuracy["overall"] >= 0.75, accuracy  # chance: about 0.33
    with open(folder / "processor_config.json") as f:
        assert json.load(f)["end_of_turn"] == "[UNUSED_TOKEN_145]"
    assert {"model.safetensors", "tokenizer.model", "preprocessor_config.json", "README.md", *CODE_FILES} <= set(
        os.listdir(folder))
    assert not any(os.path.islink(folder / name) for name in CODE_FILES) and "model_folder.py" not in os.listdir(folder)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_model(tmp_path):
    tiny = ["--vision_warmup_steps", "3", "--steps", "4", "--batch_size", "4", "--warmup_steps", "2",
            "--curriculum_steps", "1", "--eval_samples", "1"]
    threads = torch.get_num_threads()
    try:
        ts.main(["--output_dir", str(tmp_path / "a"), *tiny])
        ts.main(["--output_dir", str(tmp_path / "b"), "--link_code", *tiny])
        ts.main(["--output_dir", str(tmp_path / "c"), "--seed", "1", *tiny])
    finally:
        torch.set_num_threads(threads)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for name in CODE_FILES:  # --link_code: relative links to this checkout's modules, as default_model/ has
        link = tmp_path / "b" / name
        assert os.path.islink(link) and os.path.samefile(link, os.path.join(ROOT, name))
        assert not os.path.isabs(os.readlink(link))
    assert "model_folder.py" not in os.listdir(tmp_path / "b")
