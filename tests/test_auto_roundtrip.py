"""A saved folder loads through the Auto classes in a fresh, offline process and gives the same logits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_model
from PIL import Image
from tiny_sp import tiny_sp_path

from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer

CHILD = textwrap.dedent("""
    import json, sys, torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer
    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = json.load(open(folder + "/prompt.json"))
    inputs = processor(text=prompt, images=[Image.open(folder + "/image.png")])
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    torch.save({"logits": logits, "hidden": hidden, "input_ids": inputs["input_ids"],
                "tokens": tokenizer("a red circle")["input_ids"],
                "classes": [type(model).__module__, type(processor).__module__, type(tokenizer).__module__]}, out)
""")


@pytest.mark.slow
@pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])
def test_saved_folder_loads_offline_in_a_fresh_process_with_identical_logits(tmp_path, version):
    model = build_model(version)
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(version)))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    Image.new("RGB", (50, 40), (30, 200, 90)).save(folder / "image.png")
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "<ImageHere>What is it?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    (folder / "prompt.json").write_text(json.dumps(prompt))
    inputs = processor(text=prompt, images=[Image.open(folder / "image.png")])
    with torch.no_grad():
        expected = model(**inputs).logits

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], check=True, env=env, cwd=tmp_path)
    got = torch.load(out)
    assert all(m.startswith("transformers_modules") for m in got["classes"])  # the folder's code, not ours
    assert torch.equal(got["input_ids"], inputs["input_ids"])
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.num_image_tokens
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-6)  # thread counts may differ
    assert got["hidden"].shape[:2] == expected.shape[:2]
    assert got["tokens"] == processor.tokenizer("a red circle")["input_ids"]
