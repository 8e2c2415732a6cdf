"""The model as the Hugging Face stack drives any checkpoint (issue #14): the Auto classes, save_pretrained and
Trainer.save_model, pipelines, standard chat messages, image URLs, PEFT LoRA, accelerate offloading, transformers'
output flags, labels, resized embeddings and compiled static-cache decoding, through transformers, peft and
accelerate entry points only.

Whatever loads a folder runs in a fresh, offline process with its own module cache and an empty PYTHONPATH, so it
sees only the folder's code. Pictures come from the embedded model's own generator (tiny_synthetic.make_sample),
so the shipped model's answers are checked against what was drawn; model-level behaviour uses tiny random models.
"""

import functools
import http.server
import json
import os
import random
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import transformers
from conftest import ROOT, build_model, image_ids
from packaging import version
from transformers.pipelines import SUPPORTED_TASKS

import tiny_synthetic
from configuration_xcomposer import LORA_TARGETS
from processing_xcomposer import CHAT_MARKERS, IMAGE_PLACEHOLDER

FOLDER = os.path.join(ROOT, "default_model")
# What a decoded answer must never show: the chat formats' control pieces, BOS/EOS and the image placeholder.
CONTROL_PIECES = sorted({piece for pieces in CHAT_MARKERS.values() for piece in pieces} | {"<s>", "</s>",
                                                                                          IMAGE_PLACEHOLDER})
TIMEOUT_S = 600  # a hang fails the test instead of stalling the run; no result depends on how fast it is

# Shared by the child processes: the sample files the parent wrote, chat messages and model inputs made of them,
# the result file.
CHILD_PRELUDE = """
import json, sys
import torch
from PIL import Image
args = sys.argv[1:]
samples = json.load(open(args[0]))  # [{"kind", "question", "answer", "images": [png paths]}]

def messages(sample):
    images = [{"type": "image", "image": Image.open(path)} for path in sample["images"]]
    return [{"role": "user", "content": images + [{"type": "text", "text": sample["question"]}]}]

def chat_inputs(processor, sample):  # the sample's user turn as model inputs, as transformers documents it
    return processor.apply_chat_template(messages(sample), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")

def finish(result):
    json.dump(result, open(args[-1], "w"))
"""


def run_child(tmp_path, code: str, samples, *args, name: str = "child") -> tuple[dict, str]:
    """Run `code` in a fresh offline Python with the samples file (None: no samples), the arguments and a result
    file; returns (result, stderr)."""
    result = tmp_path / f"{name}.json"
    if samples is None:
        samples = tmp_path / "no_samples.json"
        samples.write_text("[]")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), str(samples), *map(str, args), str(result)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(result) as f:
        return json.load(f), done.stderr


@functools.lru_cache(maxsize=None)
def image_size() -> int:
    with open(os.path.join(FOLDER, "config.json")) as f:
        return json.load(f)["vision_config"]["image_size"]


def write_samples(tmp_path, per_kind: int = 2, kinds=tiny_synthetic.KINDS, seed: int = 14) -> str:
    """Fresh pictures of each kind saved as PNG, with their question (no placeholder) and the drawn answer."""
    samples = []
    for kind in kinds:
        for index in range(per_kind):
            sample = tiny_synthetic.make_sample(random.Random(seed * 1000 + len(samples)), kind, image_size())
            paths = []
            for i, image in enumerate(sample["images"]):
                paths.append(str(tmp_path / f"{kind}_{index}_{i}.png"))
                image.save(paths[-1])
            samples.append({"kind": kind, "question": sample["question"].replace(IMAGE_PLACEHOLDER, ""),
                            "answer": sample["answer"], "images": paths})
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    return str(path)


def truths(samples_path) -> list[str]:
    with open(samples_path) as f:
        return [sample["answer"] for sample in json.load(f)]


def assert_no_control_pieces(texts) -> None:
    for text in texts:
        found = [piece for piece in CONTROL_PIECES if piece in text]
        assert not found, (text, found)


def pixels(config, n: int = 1, seed: int = 0) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_ids(config, num_images: int = 1) -> torch.Tensor:
    return torch.tensor([[1, 20, 21, 22, *image_ids(config, num_images), 30, 31]])


# --------------------------------------------------------------------------- 1. saving after an Auto load

SAVE_AFTER_AUTO_LOAD = """
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
folder, model_out, config_out, logits_out = args[1:5]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = chat_inputs(processor, samples[0])
model.save_pretrained(model_out)
AutoConfig.from_pretrained(folder, trust_remote_code=True).save_pretrained(config_out)
with torch.no_grad():
    torch.save(model(**inputs).logits, logits_out)
finish({})
"""

RELOAD = """
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
folder, model_out, config_out, logits_out = args[1:5]
model = AutoModelForCausalLM.from_pretrained(model_out, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = chat_inputs(processor, samples[0])
with torch.no_grad():
    torch.save(model(**inputs).logits, logits_out)
saved, shipped = (AutoConfig.from_pretrained(f, trust_remote_code=True) for f in (config_out, folder))
saved_dict, shipped_dict = saved.to_dict(), shipped.to_dict()
for where in (saved_dict, shipped_dict):
    where.pop("_name_or_path", None)
finish({"module": type(model).__module__, "config_class": type(saved).__module__,
        "configs_equal": saved_dict == shipped_dict})
"""


@pytest.mark.slow
def test_save_pretrained_after_an_auto_load_reloads_in_a_fresh_process_with_equal_logits(tmp_path):
    samples = write_samples(tmp_path, per_kind=1, kinds=["relation"])
    model_out, config_out = tmp_path / "saved", tmp_path / "saved_config"
    _, stderr = run_child(tmp_path, SAVE_AFTER_AUTO_LOAD, samples, FOLDER, model_out, config_out, tmp_path / "a.pt",
                          name="save")
    assert "use_return_dict" not in stderr  # a plain forward call reads no deprecated config property (5.x)
    assert {"config.json", "model.safetensors", "modeling_xcomposer.py"} <= set(os.listdir(model_out))
    assert {"config.json", "configuration_xcomposer.py"} <= set(os.listdir(config_out))
    got, _ = run_child(tmp_path, RELOAD, samples, FOLDER, model_out, config_out, tmp_path / "b.pt", name="reload")
    assert got["module"].startswith("transformers_modules.saved.")  # the saved folder's own code
    assert got["config_class"].startswith("transformers_modules.saved_config.") and got["configs_equal"]
    torch.testing.assert_close(torch.load(tmp_path / "b.pt"), torch.load(tmp_path / "a.pt"), rtol=1e-5, atol=1e-6)


TRAIN_AND_SAVE = """
from transformers import AutoModelForCausalLM, AutoProcessor, Trainer, TrainingArguments
folder, model_out, logits_out = args[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
rows = []
for sample in samples:  # the whole conversation as labels: the model masks the image positions itself
    conversation = messages(sample) + [{"role": "assistant", "content": sample["answer"]}]
    batch = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    rows.append({**batch, "labels": batch["input_ids"]})
prompt = chat_inputs(processor, samples[0])
with torch.no_grad():
    before = model.eval()(**prompt).logits
arguments = TrainingArguments(output_dir=model_out + "_run", max_steps=2, per_device_train_batch_size=1,
                              learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True)
trainer = Trainer(model=model.train(), args=arguments, train_dataset=rows, data_collator=lambda batch: batch[0])
trainer.train()
trainer.save_model(model_out)
with torch.no_grad():
    after = model.eval()(**prompt).logits
torch.save({"before": before, "after": after}, logits_out)
finish({"loss": trainer.state.log_history[-1]["train_loss"]})
"""

RELOAD_TRAINED = """
from transformers import AutoModelForCausalLM, AutoProcessor
folder, model_out, logits_out = args[1:4]
model = AutoModelForCausalLM.from_pretrained(model_out, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
prompt = chat_inputs(processor, samples[0])
with torch.no_grad():
    torch.save(model(**prompt).logits, logits_out)
finish({"module": type(model).__module__})
"""


@pytest.mark.slow
def test_users_own_trainer_saves_an_auto_loaded_model_that_reloads_with_the_trained_logits(tmp_path):
    samples = write_samples(tmp_path, per_kind=1, kinds=["colour", "count"])
    model_out = tmp_path / "trained"
    trained, _ = run_child(tmp_path, TRAIN_AND_SAVE, samples, FOLDER, model_out, tmp_path / "a.pt", name="train")
    assert trained["loss"] > 0 and os.path.isfile(model_out / "config.json")
    got, _ = run_child(tmp_path, RELOAD_TRAINED, samples, FOLDER, model_out, tmp_path / "b.pt", name="reload")
    assert got["module"].startswith("transformers_modules.trained.")
    expected = torch.load(tmp_path / "a.pt")
    assert not torch.allclose(expected["after"], expected["before"])  # the two steps changed the model
    torch.testing.assert_close(torch.load(tmp_path / "b.pt"), expected["after"], rtol=1e-5, atol=1e-6)


def fail_mid_save(monkeypatch):
    """safetensors' save_file writes half of its bytes, then the disk is full."""
    import safetensors.torch
    import transformers.modeling_utils

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata)[: 1 << 10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    if hasattr(transformers.modeling_utils, "safe_save_file"):  # the name modeling_utils imported it under
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def test_a_failed_save_leaves_no_folder_that_looks_loadable(tmp_path, monkeypatch):
    model = build_model(2)
    ids, px = prompt_ids(model.config), pixels(model.config)
    model.save_pretrained(tmp_path / "earlier")
    with torch.no_grad():
        expected = model(ids, pixel_values=px).logits
    with monkeypatch.context() as patch:
        fail_mid_save(patch)
        with pytest.raises(OSError, match="No space left"):
            model.save_pretrained(tmp_path / "fresh")
        with pytest.raises(OSError, match="No space left"):
            build_model(2, seed=1).save_pretrained(tmp_path / "earlier")  # over a complete earlier save
    fresh = tmp_path / "fresh"
    assert not fresh.exists() or os.listdir(fresh) == []  # no config.json, no half-written weights
    assert sorted(n for n in os.listdir(tmp_path / "earlier") if not n.endswith(".py")) == [
        "config.json", "generation_config.json", "model.safetensors"]
    reloaded = type(model).from_pretrained(tmp_path / "earlier").eval()  # still the earlier, complete model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, pixel_values=px).logits, expected)


# --------------------------------------------------------------------------- 2. pipelines

PIPELINES = """
from transformers import AutoTokenizer, pipeline
folder = args[1]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
processor_loaded = pipe.processor is not None
if not processor_loaded:  # 4.51: pipeline() loads processors only for transformers' own model types
    pipe = pipeline("image-text-to-text", model=folder, processor=folder, trust_remote_code=True)
chat, prompted, bare = [], [], []
for sample in samples:
    out = pipe(text=messages(sample), max_new_tokens=8)
    chat.append(out[0]["generated_text"][-1]["content"])
    images = [Image.open(path) for path in sample["images"]]
    # Plain text is a raw prompt in transformers' pipelines; the chat template renders one from the question.
    text = pipe.processor.apply_chat_template(messages(sample), add_generation_prompt=True, tokenize=False)
    prompted.append(pipe(images=images, text=text, max_new_tokens=8, return_full_text=False)[0]["generated_text"])
    # A bare question (no placeholders) with images is put in a chat turn, as model.chat does.
    question = sample["question"].replace("<ImageHere>", "")
    bare.append(pipe(images=images, text=question, max_new_tokens=8, return_full_text=False)[0]["generated_text"])
generator = pipeline("text-generation", model=folder, trust_remote_code=True)
tokenizer_loaded = generator.tokenizer is not None
if not tokenizer_loaded:  # 4.51: only for transformers' own model types or a config naming its tokenizer_class
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=folder, tokenizer=tokenizer, trust_remote_code=True)
texts = [generator("How many shapes are there?", max_new_tokens=6)[0]["generated_text"],
         generator([{"role": "user", "content": "What colour is the shape?"}],
                   max_new_tokens=6)[0]["generated_text"][-1]["content"]]
finish({"chat": chat, "prompted": prompted, "bare": bare, "text_generation": texts,
        "processor_loaded": processor_loaded, "tokenizer_loaded": tokenizer_loaded})
"""


@pytest.mark.slow
@pytest.mark.skipif("image-text-to-text" not in SUPPORTED_TASKS, reason="this transformers has no such pipeline")
def test_pipelines_answer_chat_messages_bare_questions_and_rendered_prompts_without_control_pieces(tmp_path):
    samples = write_samples(tmp_path)
    got, _ = run_child(tmp_path, PIPELINES, samples, FOLDER)
    if version.parse(transformers.__version__) >= version.parse("4.57"):  # no processor= or tokenizer= needed
        assert got["processor_loaded"] and got["tokenizer_loaded"]
    expected = truths(samples)
    assert [text.strip() for text in got["chat"]] == expected
    assert [text.strip() for text in got["prompted"]] == expected
    assert [text.strip() for text in got["bare"]] == expected
    assert_no_control_pieces(got["chat"] + got["prompted"] + got["bare"] + got["text_generation"])
    assert all(got["text_generation"])


# --------------------------------------------------------------------------- 3. chat messages, one and a batch

CHAT_TEMPLATE_AND_GENERATE = """
from transformers import AutoModelForCausalLM, AutoProcessor
folder = args[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
answers, raw = [], []
for sample in samples:
    inputs = chat_inputs(processor, sample)
    out = model.generate(**inputs, max_new_tokens=8)
    new = out[0, inputs["input_ids"].shape[1]:]
    answers.append(processor.decode(new, skip_special_tokens=True))
    raw.append(processor.tokenizer.decode(new, skip_special_tokens=True))
batch = processor.apply_chat_template([messages(s) for s in samples], add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=8)
batched = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
finish({"answers": answers, "tokenizer": raw, "batched": batched})
"""


@pytest.mark.slow
def test_chat_messages_through_apply_chat_template_and_generate_answer_the_picture(tmp_path):
    samples = write_samples(tmp_path)
    got, _ = run_child(tmp_path, CHAT_TEMPLATE_AND_GENERATE, samples, FOLDER)
    assert got["answers"] == truths(samples)
    assert got["tokenizer"] == got["answers"]
    assert got["batched"] == got["answers"]  # a left-padded batch of conversations answers as each alone
    assert_no_control_pieces(got["answers"] + got["batched"])


# --------------------------------------------------------------------------- 4. images as transformers names them

IMAGE_SOURCES = """
import base64, pathlib
from transformers import AutoProcessor
folder, url = args[1:3]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
path = samples[0]["images"][0]
encoded = base64.b64encode(open(path, "rb").read()).decode()
forms = {"pil": {"image": Image.open(path)}, "path": {"path": path}, "plain path as url": {"url": path},
         "plain path as image": {"image": path}, "file url": {"url": pathlib.Path(path).as_uri()},
         "http url": {"url": url}, "http url as image": {"image": url},
         "data url": {"url": "data:image/png;base64," + encoded}, "base64": {"base64": encoded}}
out = {}
for name, item in forms.items():
    conversation = [{"role": "user", "content": [{"type": "image", **item}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out[name] = {"pixel_values": inputs["pixel_values"].flatten().tolist(), "input_ids": inputs["input_ids"].tolist()}
finish(out)
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_image_urls_paths_and_base64_in_messages_give_the_pixels_of_the_pil_image(tmp_path):
    samples = write_samples(tmp_path, per_kind=1, kinds=["shape"])
    name = os.path.basename(json.loads(open(samples).read())[0]["images"][0])
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        got, _ = run_child(tmp_path, IMAGE_SOURCES, samples, FOLDER, f"http://127.0.0.1:{server.server_port}/{name}")
    finally:
        server.shutdown()
        thread.join()
    reference = got.pop("pil")
    assert len(reference["pixel_values"]) == 3 * image_size() ** 2
    for form, inputs in got.items():
        assert inputs == reference, form


# --------------------------------------------------------------------------- 5. PEFT


def lora_modules(peft_model) -> dict:
    return {name: module for name, module in peft_model.named_modules()
            if "default" in getattr(module, "lora_B", {})}


def assert_every_adapter_takes_effect(peft_model, inputs) -> None:
    """Perturbing any one adapter's B (PEFT starts it at zero) changes the logits."""
    with torch.no_grad():
        base = peft_model(**inputs).logits
        for name, module in lora_modules(peft_model).items():
            weight = module.lora_B["default"].weight
            original = weight.clone()
            weight.normal_(generator=torch.Generator().manual_seed(0))
            changed = not torch.allclose(peft_model(**inputs).logits, base)
            weight.copy_(original)
            assert changed, f"the adapter on {name} has no effect"


def test_peft_all_linear_lora_runs_and_every_adapter_it_places_takes_effect(version, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build_model(version)
    config = model.config
    ids, px = prompt_ids(config), pixels(config)
    inputs = dict(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        plain = model(**inputs).logits
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2, lora_alpha=4))
    adapted = lora_modules(peft_model)
    assert any(name.endswith("vision_tower.blocks.0.attn.qkv") for name in adapted)  # the ViT too
    assert any(name.endswith("language_model.layers.0.attention.wqkv") for name in adapted)
    assert not any(name.endswith((".A", ".B", ".output")) for name in adapted)  # PLoRA factors, LM head
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, plain)  # zero B: the base model's output
    assert_every_adapter_takes_effect(peft_model, inputs)

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        tuned = peft_model(**inputs).logits
    out = peft_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[:, :ids.shape[1]], ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_model(version), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tuned)


def test_peft_lora_on_the_decoder_only_leaves_the_vision_side_untouched(version):
    from peft import LoraConfig, get_peft_model

    from finetune import DEFAULT_LORA_TARGETS  # the recipe the README gives

    model = build_model(version)
    config = model.config
    expected = {name for name, _ in model.named_modules()
                if ".language_model.layers." in name and name.rsplit(".", 1)[-1] in LORA_TARGETS}
    assert len(expected) == config.text_config.num_hidden_layers * len(LORA_TARGETS)
    peft_model = get_peft_model(model, LoraConfig(target_modules=DEFAULT_LORA_TARGETS, r=2, lora_alpha=4,
                                                  task_type="CAUSAL_LM"))
    assert {name.removeprefix("base_model.model.") for name in lora_modules(peft_model)} == expected
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name and ".language_model." in name for name in trainable)
    ids, px = prompt_ids(config), pixels(config)
    inputs = dict(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids))
    assert_every_adapter_takes_effect(peft_model, inputs)
    with torch.no_grad():
        features = peft_model.get_image_features(px)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        torch.testing.assert_close(peft_model.get_image_features(px), features, rtol=0, atol=0)
    out = peft_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


# --------------------------------------------------------------------------- 6. accelerate offloading

OFFLOAD = """
from transformers import AutoModelForCausalLM, AutoProcessor
folder, offload = args[1:3]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
split = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="auto",
                                             max_memory={"cpu": "3MB"}, offload_folder=offload).eval()
result = {"device_map": sorted(set(map(str, split.hf_device_map.values()))), "answers": [], "logits_equal": []}
for sample in samples:
    inputs = chat_inputs(processor, sample)
    with torch.no_grad():
        result["logits_equal"].append(torch.allclose(split(**inputs).logits, plain(**inputs).logits,
                                                     rtol=1e-5, atol=1e-6))
    tokens = [model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:].tolist()
              for model in (plain, split)]
    result["answers"].append([processor.decode(t, skip_special_tokens=True) for t in tokens])
finish(result)
"""


@pytest.mark.slow
def test_accelerate_disk_offload_chats_and_scores_as_the_plain_model(tmp_path):
    samples = write_samples(tmp_path, per_kind=1)
    got, _ = run_child(tmp_path, OFFLOAD, samples, FOLDER, tmp_path / "offload")
    assert "disk" in got["device_map"]  # 3 MB of memory: most of the model really lives on disk
    assert all(got["logits_equal"])
    assert [plain for plain, _ in got["answers"]] == truths(samples)
    assert [split for _, split in got["answers"]] == truths(samples)


# --------------------------------------------------------------------------- 7. output flags


def reference_decoder(model):
    """transformers' own decoder of the same sizes: where the shapes of its outputs are documented."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = model.config.text_config
    config = LlamaConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                         pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id, bos_token_id=text.bos_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def shapes(value):
    """The nesting and tensor shapes of an output, as a comparable value."""
    if torch.is_tensor(value):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(shapes(v) for v in value)
    return value


GENERATE_FLAGS = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                      output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_and_hidden_states_have_transformers_shapes_in_forward_and_generate(attn):
    model, eager = build_model(2, attn=attn), build_model(2, attn="eager")
    config = model.config
    ids, px = prompt_ids(config), pixels(config)
    batch, length = ids.shape
    text = config.text_config
    with torch.no_grad():
        out = model(ids, pixel_values=px, output_attentions=True, output_hidden_states=True)
        reference = eager(ids, pixel_values=px, output_attentions=True).attentions
    assert shapes(out.attentions) == ((batch, text.num_attention_heads, length, length),) * text.num_hidden_layers
    for weights, expected in zip(out.attentions, reference):
        torch.testing.assert_close(weights, expected)  # sdpa too: the real weights, not an empty tuple
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights.triu(1) == 0).all()  # causal
    assert shapes(out.hidden_states) == ((batch, length, text.hidden_size),) * (text.num_hidden_layers + 1)
    torch.testing.assert_close(model.output(out.hidden_states[-1]), out.logits)  # the last one is after the norm

    generated = model.generate(ids, pixel_values=px, attention_mask=torch.ones_like(ids), **GENERATE_FLAGS)
    llama = reference_decoder(model)
    text_ids = ids.masked_fill(ids == config.image_token_id, 5)
    documented = llama.generate(text_ids, attention_mask=torch.ones_like(ids), **GENERATE_FLAGS)
    assert type(generated).__name__ == type(documented).__name__ == "GenerateDecoderOnlyOutput"
    for field in ("scores", "logits", "attentions", "hidden_states"):
        assert shapes(getattr(generated, field)) == shapes(getattr(documented, field)), field
    steps = [attentions[0].shape for attentions in generated.attentions]  # per step: new queries x keys so far
    assert steps == [(1, text.num_attention_heads, length, length), (1, text.num_attention_heads, 1, length + 1),
                     (1, text.num_attention_heads, 1, length + 2)]
    assert generated.sequences.shape == (1, length + 3)


def test_config_output_flags_and_return_dict_behave_as_in_transformers_decoders():
    model = build_model(2)
    config = model.config
    ids, px = prompt_ids(config), pixels(config)
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    with torch.no_grad():
        expected = model(ids, pixel_values=px)
        assert expected.hidden_states is None and expected.attentions is None
        as_tuple = model(ids, pixel_values=px, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple) and as_tuple[0].ndim == 0  # loss first, as transformers orders it
        torch.testing.assert_close(as_tuple[1], expected.logits)

        config.output_hidden_states = True
        flagged = model(ids, pixel_values=px)
        assert len(flagged.hidden_states) == config.text_config.num_hidden_layers + 1
        assert model(ids, pixel_values=px, output_hidden_states=False).hidden_states is None  # the argument wins
        config.output_hidden_states = False
        eager = build_model(2, attn="eager")
        eager.config.output_attentions = True  # transformers refuses this setting unless attention is eager
        assert len(eager(ids, pixel_values=px).attentions) == config.text_config.num_hidden_layers

        config.return_dict = False
        plain = model(ids, pixel_values=px)
        assert isinstance(plain, tuple)
        torch.testing.assert_close(plain[0], expected.logits)
        assert not isinstance(model(ids, pixel_values=px, return_dict=True), tuple)  # the argument wins
    greedy = model.generate(ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                            do_sample=False)  # generate asks forward for a dict whatever the config says
    config.return_dict = True
    assert torch.equal(greedy, model.generate(ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------- 8. labels


def test_labels_equal_to_input_ids_ignore_the_image_positions(version):
    model = build_model(version)
    config = model.config
    ids, px = prompt_ids(config), pixels(config)
    masked = ids.masked_fill(ids == config.image_token_id, -100)
    loss = model(ids, pixel_values=px, labels=ids).loss
    with torch.no_grad():
        out = model(ids, pixel_values=px, labels=masked)
    torch.testing.assert_close(loss.detach(), out.loss)
    target = masked[0, 1:]
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1][target != -100], target[target != -100])
    torch.testing.assert_close(out.loss, manual)
    loss.backward()
    assert model.model.vision_tower.embeddings.patch_embed.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- 9. resized embeddings

RELOAD_RESIZED = """
from transformers import AutoModelForCausalLM
folder, inputs_path, logits_out = args[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(inputs_path)
with torch.no_grad():
    torch.save(model(**inputs).logits, logits_out)
finish({"vocab": model.get_input_embeddings().num_embeddings, "head": model.get_output_embeddings().out_features,
        "image_token_id": model.config.image_token_id})
"""


@pytest.mark.slow
def test_resized_embeddings_save_reload_and_never_generate_the_image_id(version, tmp_path):
    model = build_model(version)
    config = model.config
    image_id = config.image_token_id
    assert image_id == config.text_config.vocab_size  # outside the table before resizing
    model.resize_token_embeddings(image_id + 8)  # the image id is now a row of the table
    assert model.get_input_embeddings().num_embeddings == model.output.out_features == image_id + 8
    assert config.text_config.vocab_size == image_id + 8 and config.image_token_id == image_id
    ids, px = prompt_ids(config), pixels(config)
    with torch.no_grad():
        logits = model(ids, pixel_values=px).logits
    assert logits.shape[-1] == image_id + 8 and (logits[..., image_id] == torch.finfo(logits.dtype).min).all()

    first_image = ids[0].tolist().index(image_id)
    with torch.no_grad():  # inputs_embeds from the model's own table, on ids that include image ids
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        prefix = model(ids[:, :first_image]).logits
    assert embedded.shape == logits.shape and torch.isfinite(embedded).all()
    torch.testing.assert_close(embedded[:, :first_image], prefix)

    favour_image_id = torch.zeros(image_id + 8)
    favour_image_id[image_id] = 1e4
    hook = model.output.register_forward_hook(lambda module, args, out: out + favour_image_id)
    out = model.generate(ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    hook.remove()
    assert image_id not in out[0, ids.shape[1]:].tolist()

    model.save_pretrained(tmp_path / "resized")
    torch.save({"input_ids": ids, "pixel_values": px}, tmp_path / "inputs.pt")
    got, _ = run_child(tmp_path, RELOAD_RESIZED, None, tmp_path / "resized",
                       tmp_path / "inputs.pt", tmp_path / "logits.pt")
    assert got == {"vocab": image_id + 8, "head": image_id + 8, "image_token_id": image_id}
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 10. static cache and torch.compile

COMPILED = """
import torch._dynamo
from transformers import AutoModelForCausalLM, AutoProcessor, CompileConfig
folder = args[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
compile_config = CompileConfig(fullgraph=True, dynamic=False)  # a graph break is an error
compile_config._compile_all_devices = True  # generate compiles only on accelerators unless asked
result = {"dynamic": [], "compiled": [], "answers": []}
for sample in samples:
    inputs = chat_inputs(processor, sample)
    length = inputs["input_ids"].shape[1]
    answer = model.generate(**inputs, max_new_tokens=8)[0, length:-1].tolist()  # without its end-of-turn
    result["answers"].append([answer, processor.decode(answer, skip_special_tokens=True)])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6)  # six decode steps: the answer, then on past its end
    result["dynamic"].append(model.generate(**inputs, **kwargs)[0, length:].tolist())
    compiled = model.generate(**inputs, **kwargs, cache_implementation="static", compile_config=compile_config)
    result["compiled"].append(compiled[0, length:].tolist())
counters = torch._dynamo.utils.counters
result["graphs"] = counters["stats"]["unique_graphs"]
result["graph_breaks"] = sum(counters["graph_break"].values())
finish(result)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(transformers, "CompileConfig"), reason="this transformers has no CompileConfig")
def test_static_cache_decoding_compiles_without_graph_breaks_and_gives_the_same_tokens(tmp_path):
    samples = write_samples(tmp_path, per_kind=1, kinds=["relation", "compare"])
    got, _ = run_child(tmp_path, COMPILED, samples, FOLDER)
    assert got["compiled"] == got["dynamic"]
    assert [text for _, text in got["answers"]] == truths(samples)
    for (answer, _), compiled in zip(got["answers"], got["compiled"]):
        assert compiled[:len(answer)] == answer
    # Decode steps ran as compiled graphs: one per prompt (each has its own cache length), not one per step.
    assert 1 <= got["graphs"] <= len(truths(samples)) and got["graph_breaks"] == 0

