"""finetune.py: label masking, training steps, LoRA save/merge, DDP with text-only batches, bad data."""

import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, build_model
from PIL import Image
from tiny_sp import tiny_sp_path

import finetune
import training_recipes as tr
from configuration_xcomposer import LORA_TARGETS
from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer


def make_processor(model):
    version = 1 if model.config.connector == "perceive_sampler" else 2
    return XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(version)))


def write_image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
    return os.path.basename(path)


def write_data(folder, records, name="data.jsonl"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def mixed_records(folder, n=8):
    """Upstream-format samples with one or two images, and role/content text-only samples."""
    records = []
    for i in range(n):
        if i % 2:
            records.append({"id": f"text-{i}", "messages": [{"role": "user", "content": f"count to {i}"},
                                                          {"role": "assistant", "content": "one two"}]})
        else:
            images = [write_image(os.path.join(folder, f"im{i}_{j}.png"), i + j) for j in range(1 + i % 4 // 2)]
            records.append({"id": f"img-{i}", "image": images, "conversations": [
                {"from": "user", "value": "<ImageHere>" * len(images) + "What is it?"},
                {"from": "assistant", "value": "a red circle"}]})
    return records


# --------------------------------------------------------------------------- labels


def test_labels_train_only_assistant_answers_and_their_end_piece():
    model = build_model(2)
    processor = make_processor(model)
    tokenizer = processor.tokenizer
    encoder = finetune.ChatEncoder(processor, system="be brief")
    messages = [{"role": "user", "content": "<ImageHere>What is it?"}, {"role": "assistant", "content": "a star"},
                {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
    input_ids, labels = encoder(messages)

    def ids(text, first=False):
        return processor.encode_prompt(text, add_special_tokens=first)

    prompt1 = ("[UNUSED_TOKEN_146]system\nbe brief[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n<ImageHere>What is it?"
               "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    answer1, prompt2 = "a star[UNUSED_TOKEN_145]", "\n[UNUSED_TOKEN_146]user\nColour?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    answer2 = "red[UNUSED_TOKEN_145]"
    segments = [(ids(prompt1, True), False), (ids(answer1), True), (ids(prompt2), False), (ids(answer2), True)]
    assert input_ids == [t for seg, _ in segments for t in seg]
    assert labels == [t if trained else -100 for seg, trained in segments for t in seg]
    # exact positions: the first answer starts right after the prompt, image tokens and BOS are masked
    start = len(segments[0][0])
    assert labels[:start] == [-100] * start and labels[start:start + len(segments[1][0])] == segments[1][0]
    assert input_ids[0] == tokenizer.bos_token_id and input_ids.count(model.config.image_token_id) == 4
    assert tokenizer.decode([t for t in labels if t != -100]) == "a star[UNUSED_TOKEN_145]red[UNUSED_TOKEN_145]"
    # the prompt is tokenized exactly as model.chat tokenizes it
    chat_prompt = processor.apply_chat_template([{"role": "system", "content": "be brief"}, messages[0]],
                                                add_generation_prompt=True, tokenize=False)
    assert processor.encode_prompt(chat_prompt) == input_ids[:start]


def test_v1_labels_end_with_its_end_of_answer_piece():
    model = build_model(1)
    processor = make_processor(model)
    encoder = finetune.ChatEncoder(processor)
    input_ids, labels = encoder([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    trained = [t for t in labels if t != -100]
    assert trained[-1] == processor.tokenizer.convert_tokens_to_ids("<TOKENS_UNUSED_1>")
    assert processor.tokenizer.decode(trained).strip() == "yes<TOKENS_UNUSED_1>"


def test_collator_pads_right_and_masks_padding():
    features = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "pixel_values": None},
                {"input_ids": [1, 7], "labels": [-100, 7], "pixel_values": torch.zeros(2, 3, 28, 28)}]
    batch = finetune.DataCollator(pad_token_id=2)(features)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert "pixel_values" not in finetune.DataCollator(2)(features[:1])


# --------------------------------------------------------------------------- training


def test_a_few_steps_lower_the_loss(version, tmp_path):
    torch.manual_seed(0)
    model = build_model(version).train()
    processor = make_processor(model)
    finetune.apply_switches(model, finetune.ModelArguments(train_vision_tower=True))
    dataset = finetune.ConversationDataset(mixed_records(tmp_path, 4), finetune.ChatEncoder(
        processor, system=""), max_length=256, image_folder=str(tmp_path))
    batch = finetune.DataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=8,
                                      learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                      disable_tqdm=True, logging_strategy="no")
    finetune.build_trainer(model, processor, dataset, args).train()
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    assert after < before * 0.8


def test_freeze_switches_choose_what_trains():
    model = build_model(2)
    counts = finetune.apply_switches(model, finetune.ModelArguments(train_llm=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.vision_proj.") or n.endswith((".A.weight", ".B.weight"))
                             for n in trainable)
    assert counts["vision"] == counts["llm"] == 0 < counts["lora"] and counts["connector"] > 0
    assert finetune.image_only_parameters_trainable(model) and not finetune.text_rows_trainable(model)
    finetune.apply_switches(model, finetune.ModelArguments(train_connector=False, train_plora=False))
    assert not finetune.image_only_parameters_trainable(model) and finetune.text_rows_trainable(model)
    finetune.apply_switches(model, finetune.ModelArguments(use_lora=True))  # PEFT LoRA replaces the LLM's own
    assert not any(p.requires_grad for n, p in model.named_parameters() if tr.part_of(n) == "llm")


# --------------------------------------------------------------------------- LoRA


def lora_model(seed=0):
    model = build_model(2, seed=seed).float()
    finetune.apply_switches(model, finetune.ModelArguments(use_lora=True))
    model = finetune.apply_lora(model, finetune.ModelArguments(use_lora=True, lora_rank=4, lora_alpha=8,
                                                                lora_dropout=0.0))
    return model


def image_batch(model, processor):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    return processor(text=["<ImageHere>hello there", "just text here"], images=[[image], []])


def test_lora_targets_only_decoder_linears_and_keeps_partial_lora_active():
    model = lora_model()
    names = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert names and all(".language_model.layers." in n for n in names)
    assert {n.split(".")[-2] for n in names} == set(LORA_TARGETS)  # derived from the config's list
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    base = build_model(2).float()
    processor = make_processor(base)
    batch = image_batch(base, processor)
    with torch.no_grad():  # fresh LoRA (B = 0) leaves the model, Partial LoRA on image rows included, unchanged
        torch.testing.assert_close(model.eval()(**batch).logits, base(**batch).logits)


def test_lora_adapter_save_load_merge_gives_identical_logits(tmp_path):
    from peft import PeftModel

    base = build_model(2).float()
    processor = make_processor(base)
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    model = lora_model()
    with torch.no_grad():  # as if trained: adapters, the connector and Partial LoRA all changed
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    batch = image_batch(model, processor)
    with torch.no_grad():
        expected = model(**batch).logits
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    finetune.save_non_lora_trainables(model, str(adapter))

    reloaded, _ = finetune.load_model_and_processor(str(tmp_path / "base"), dtype=torch.float32)
    finetune.load_non_lora_trainables(reloaded, str(adapter))
    reloaded = PeftModel.from_pretrained(reloaded, adapter).eval()
    finetune.main(["--model_name_or_path", str(tmp_path / "base"), "--merge_adapter", str(adapter),
                   "--output_dir", str(tmp_path / "merged")])
    merged, _ = finetune.load_model_and_processor(str(tmp_path / "merged"), dtype=torch.float32)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
        torch.testing.assert_close(merged.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_ddp_with_text_only_and_image_batches(tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = write_data(tmp_path, mixed_records(tmp_path, 8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with socket.socket() as probe:  # a free port: other checkouts may run this test at the same time
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               os.path.join(ROOT, "finetune.py"), "--model_name_or_path", str(tmp_path / "model"),
               "--data_path", data, "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
               "--per_device_train_batch_size", "1", "--use_cpu", "--ddp_backend", "gloo",
               "--train_vision_tower", "True", "--report_to", "none", "--save_strategy", "no",
               "--learning_rate", "1e-3", "--disable_tqdm", "True", "--system", ""]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------- bad data


def write_corrupt_image(path):
    with open(path, "wb") as f:  # a PNG signature, then garbage: exists, has the right name, is not an image
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return os.path.basename(path)


@pytest.mark.parametrize("problem, message", [
    ("missing_image", "image file not found"),
    ("corrupt_image", "cannot read image file"),
    ("image_not_a_path", "an image must be a file path, got 5"),
    ("turn_not_an_object", "turn 0 is not an object: 'hello'"),
    ("more_placeholders", "more placeholders than images"),
    ("too_long", "longer than max_length"),
    ("empty", "empty conversation"),
])
def test_bad_samples_name_the_sample_or_are_skipped_with_a_count(problem, message, tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    good = mixed_records(tmp_path, 2)
    bad = {"id": "bad-one", "image": [write_image(tmp_path / "x.png")],
           "conversations": [{"from": "user", "value": "<ImageHere>hi"}, {"from": "assistant", "value": "ok"}]}
    if problem == "missing_image":
        bad["image"] = ["nowhere.png"]
    elif problem == "corrupt_image":
        bad["image"] = [write_corrupt_image(tmp_path / "corrupt.png")]
    elif problem == "image_not_a_path":
        bad["image"] = [5]
    elif problem == "turn_not_an_object":
        bad["conversations"] = ["hello"]
    elif problem == "more_placeholders":
        bad["conversations"][0]["value"] = "<ImageHere><ImageHere>hi"
    elif problem == "too_long":
        bad["conversations"][1]["value"] = "ok " * 200
    else:
        bad["conversations"] = []
    records = [*good, bad]
    encoder = finetune.ChatEncoder(processor, system="")
    with pytest.raises(finetune.BadSample, match=f"^sample bad-one: .*{message}"):
        finetune.ConversationDataset(records, encoder, 256, str(tmp_path))
    logs = []
    dataset = finetune.ConversationDataset(records, encoder, 256, str(tmp_path), skip_bad_samples=True,
                                           log=logs.append)
    assert len(dataset) == 2 and dataset.skipped == 1
    assert logs[0].startswith("skipping bad sample: sample bad-one: ") and message in logs[0]
    assert logs[-1] == "skipped 1 bad samples of 3 (--skip_bad_samples)"
    assert all(item["input_ids"] for item in dataset)  # what is kept loads
    del bad["id"]  # without an id, the sample is named by its index
    with pytest.raises(finetune.BadSample, match="^sample 2: "):
        finetune.ConversationDataset(records, encoder, 256, str(tmp_path))


def test_a_malformed_jsonl_line_names_its_file_and_line_and_can_be_skipped(tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    path = write_data(tmp_path, mixed_records(tmp_path, 2))
    with open(path, "a") as f:
        f.write('{"id": "cut", "conversations": [{"from": "user"\n')  # line 3, cut short
    records = finetune.load_records(path)
    assert len(records) == 3
    encoder = finetune.ChatEncoder(processor, system="")
    with pytest.raises(finetune.BadSample, match=rf"^{path} line 3: not valid JSON \("):
        finetune.ConversationDataset(records, encoder, 256, str(tmp_path))
    logs = []
    dataset = finetune.ConversationDataset(records, encoder, 256, str(tmp_path), skip_bad_samples=True,
                                           log=logs.append)
    assert len(dataset) == 2 and dataset.skipped == 1 and logs[0].startswith(f"skipping bad sample: {path} line 3")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1},')
    with pytest.raises(ValueError, match=f"^{broken}: not valid JSON"):
        finetune.load_records(str(broken))


def test_image_paths_outside_the_data_folder_are_used_with_a_warning(tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    data_folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_folder.mkdir()
    elsewhere.mkdir()
    inside = write_image(data_folder / "in.png")
    write_image(elsewhere / "out.png")

    def record(name, image):
        return {"id": name, "image": [image], "conversations": [
            {"from": "user", "value": "<ImageHere>hi"}, {"from": "assistant", "value": "ok"}]}

    encoder = finetune.ChatEncoder(processor, system="")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # paths inside the folder: no warning
        finetune.ConversationDataset([record("in", inside)], encoder, 256, str(data_folder))
    absolute, parent = str(elsewhere / "out.png"), os.path.join("..", "elsewhere", "out.png")
    records = [record("in", inside), record("abs", absolute), record("up", parent)]
    with pytest.warns(UserWarning) as caught:
        dataset = finetune.ConversationDataset(records, encoder, 256, str(data_folder))
    assert len(dataset) == 3 and dataset[1]["pixel_values"].shape == dataset[2]["pixel_values"].shape
    assert [str(w.message) for w in caught] == [
        f"2 image paths lead outside the image folder {data_folder} and are used as given: "
        f"sample abs: {absolute}; sample up: {parent}"]


def test_a_bad_image_fails_before_the_first_step_or_is_skipped(tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    records = mixed_records(tmp_path, 4)
    records[0]["image"] = [write_corrupt_image(tmp_path / "corrupt.png")]
    data = write_data(tmp_path, records)
    command = ["--model_name_or_path", str(tmp_path / "model"), "--data_path", data, "--max_steps", "1",
               "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
               "--disable_tqdm", "True", "--system", ""]
    with pytest.raises(finetune.BadSample, match="^sample img-0: cannot read image file .*corrupt.png"):
        finetune.main([*command, "--output_dir", str(tmp_path / "failed")])
    assert not (tmp_path / "failed").exists()  # no trainer, no step, nothing written
    trainer = finetune.main([*command, "--output_dir", str(tmp_path / "out"), "--skip_bad_samples", "True"])
    assert trainer.state.global_step == 1 and trainer.train_dataset.skipped == 1 and len(trainer.train_dataset) == 3
    assert (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------- the papers' recipes


def test_stage_preset_weighted_sources_and_resolution_through_the_cli(tmp_path):
    model = build_model(2)
    processor = make_processor(model)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    records = [r for r in mixed_records(tmp_path, 10) if "image" in r]  # 2024 pre-training: image-text pairs
    first = write_data(tmp_path, records[:3], "first.jsonl")
    second = write_data(tmp_path, records[3:], "second.jsonl")
    mixed = write_data(tmp_path, mixed_records(tmp_path, 4), "mixed.jsonl")
    with pytest.raises(SystemExit, match="text-only samples would train nothing"):
        finetune.main(["--model_name_or_path", str(tmp_path / "model"), "--data_path", mixed, "--stage",
                       "xcomposer2-pretrain", "--output_dir", str(tmp_path / "x"), "--use_cpu", "--report_to", "none"])
    trainer = finetune.main([
        "--model_name_or_path", str(tmp_path / "model"), "--data_path", f"{first},{second}",
        "--source_weights", "3,1", "--stage", "xcomposer2-pretrain", "--image_size", "56",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--system", ""])
    groups = trainer.optimizer.param_groups
    trained = {id(p) for g in groups for p in g["params"]}
    decoder_weight = trainer.model.model.language_model.layers[0].attention.wqkv.weight
    assert id(decoder_weight) not in trained and not decoder_weight.requires_grad  # 2024 pre-training: LLM frozen
    assert any(g.get("part") == "vision" for g in groups) and isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    assert isinstance(trainer.train_dataset, tr.SourceMix) and trainer.train_dataset.source_weights == [3.0, 1.0]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vision_config"]["image_size"] == 56
    assert "use_cache" not in saved  # Trainer's training-time switch stays out of the shared config
    out = finetune.load_model_and_processor(str(tmp_path / "out"))[0]
    assert out.config.num_image_tokens == 16
