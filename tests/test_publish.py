"""Publishing: a complete folder, a model card that parses and whose snippet runs, and the upload command."""

import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, build_model
from huggingface_hub import ModelCard
from PIL import Image
from tiny_sp import tiny_sp_path

import push_to_hub
from model_folder import FOLDER_FILES, check_model_folder, save_model_folder
from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer


def offline_env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}


@pytest.fixture
def folder(tmp_path):
    model = build_model(2, max_position_embeddings=1024)  # room for XComposer2's default system prompt
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(2)))
    path = tmp_path / "model"
    save_model_folder(model, processor, path, repo_id="someone/tiny-xcomposer2")
    return path


def test_finished_folder_is_complete(folder):
    assert check_model_folder(folder) == []
    assert set(FOLDER_FILES) <= set(os.listdir(folder))


def test_save_pretrained_of_model_and_processor_alone_has_everything_but_the_card(tmp_path):
    model = build_model(1)
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(1)))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert check_model_folder(tmp_path) == ["missing README.md"]  # the card belongs to the writers


def test_model_card_metadata_parses(folder):
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "other" and "xcomposer2" in card.data.tags


@pytest.mark.slow
def test_model_card_snippet_runs_offline(folder, tmp_path):
    text = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("someone/tiny-xcomposer2", str(folder))
    Image.new("RGB", (64, 48), (250, 120, 0)).save(tmp_path / "example.jpg")
    done = subprocess.run([sys.executable, "-c", snippet], env=offline_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("remove", ["tokenizer.model", "modeling_xcomposer.py", "model.safetensors"])
def test_incomplete_folder_is_refused_and_names_what_is_missing(folder, remove, capsys):
    os.remove(folder / remove)
    assert any(remove in problem for problem in check_model_folder(folder))
    assert push_to_hub.main([str(folder), "someone/repo"]) == 1
    assert remove in capsys.readouterr().err


class FakeHfApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://example.invalid/commit/1"


def test_upload_calls_the_hub_api_with_the_right_arguments(folder):
    api = FakeHfApi()
    push_to_hub.push(str(folder), "someone/repo", private=True, revision="v1", message="first", api=api)
    assert api.calls == [
        ("create_repo", "someone/repo", {"private": True, "exist_ok": True}),
        ("create_branch", "someone/repo", {"branch": "v1", "exist_ok": True}),
        ("upload_folder", "someone/repo", {"repo_id": "someone/repo", "folder_path": str(folder), "revision": "v1",
                                           "create_pr": False, "commit_message": "first"}),
    ]
    api = FakeHfApi()
    push_to_hub.push(str(folder), "someone/repo", create_pr=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and api.calls[1][2]["create_pr"] is True


def test_upload_writes_a_missing_model_card_from_the_config_and_says_so(tmp_path, version, capsys):
    model = build_model(version)
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(version)))
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    assert check_model_folder(tmp_path / "saved") == ["missing README.md"]
    api = FakeHfApi()
    push_to_hub.push(str(tmp_path / "saved"), "someone/repo", api=api)
    assert capsys.readouterr().out == (
        f"wrote the model card {tmp_path / 'saved' / 'README.md'} from config.json (the folder had none)\n")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert ("xcomposer2" if version == 2 else "xcomposer") in card.data.tags
    assert f"| decoder | {'InternLM2' if version == 2 else 'InternLM'}, 2 layers, width 64" in card.text
    assert 'path = "someone/repo"' in card.text
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    before = (tmp_path / "saved" / "README.md").read_text()
    push_to_hub.push(str(tmp_path / "saved"), "someone/other", api=FakeHfApi())  # a card is never overwritten
    assert capsys.readouterr().out == "" and (tmp_path / "saved" / "README.md").read_text() == before


def test_a_folder_without_an_xcomposer_config_gets_no_card_and_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert push_to_hub.main([str(tmp_path), "someone/repo"]) == 1
    assert not (tmp_path / "README.md").exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to upload {tmp_path}, it is incomplete:\n") and "missing README.md" in err


@pytest.mark.parametrize("error", push_to_hub.UNREACHABLE, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_an_unreachable_hub_is_one_clear_line(folder, error, monkeypatch, capsys):
    class Refusing(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise error("[Errno 111] Connection refused")

    monkeypatch.setattr(push_to_hub, "HfApi", Refusing)
    monkeypatch.setattr(push_to_hub.constants, "ENDPOINT", "http://hub.invalid")
    assert push_to_hub.main([str(folder), "someone/repo"]) == 1
    assert capsys.readouterr() == ("", "error: cannot reach the Hub at http://hub.invalid: [Errno 111] Connection refused\n")


@pytest.mark.slow  # a fresh process
def test_a_refused_connection_is_one_clear_line(folder, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**offline_env(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_not_a_real_token"}
    del env["HF_HUB_OFFLINE"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "push_to_hub.py"), str(folder), "someone/repo"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(rf"error: cannot reach the Hub at http://127\.0\.0\.1:{port}: .*Connection refused.*\n",
                        done.stderr), done.stderr


@pytest.mark.slow  # a fresh process
def test_upload_offline_fails_cleanly_without_a_traceback(folder, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "push_to_hub.py"), str(folder), "someone/repo"],
                          env=offline_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 1
    assert "HF_HUB_OFFLINE" in done.stderr and "Traceback" not in done.stderr


CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
text = "<ImageHere>Which colour?"
size = model.config.vision_config.image_size
image = torch.linspace(0, 1, 3 * 40 * 30).reshape(30, 40, 3).mul(255).to(torch.uint8).numpy()
inputs = processor(text=[text], images=[image])
with torch.no_grad():
    torch.save({"logits": model(**inputs).logits, "ids": inputs["input_ids"]}, out)
"""


def write_with_finetune(tmp_path):
    import finetune

    model = build_model(2)
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(2)))
    save_model_folder(model, processor, tmp_path / "ft", title=finetune.CARD_TITLE)
    return tmp_path / "ft"


def write_with_converter(tmp_path):
    import convert_upstream
    from upstream_reference import make_upstream_state_dict, tiny_upstream_config, write_upstream_checkpoint

    config = tiny_upstream_config(2, torch_dtype="float32")
    write_upstream_checkpoint(tmp_path / "upstream", config, make_upstream_state_dict(config),
                              tokenizer_model_path=tiny_sp_path(2))
    convert_upstream.convert_upstream(str(tmp_path / "upstream"), str(tmp_path / "converted"))
    return tmp_path / "converted"


@pytest.mark.slow
@pytest.mark.parametrize("writer", [write_with_finetune, write_with_converter], ids=["finetune", "converter"])
def test_every_writer_makes_a_complete_folder_that_loads_offline_with_the_same_logits(tmp_path, writer):
    import numpy as np
    import torch

    from modeling_xcomposer import XComposerForCausalLM

    folder = writer(tmp_path)
    assert check_model_folder(folder) == []
    assert ModelCard.load(folder / "README.md").data.library_name == "transformers"
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], check=True, env=offline_env(tmp_path),
                   cwd=tmp_path)
    got = torch.load(out)
    model = XComposerForCausalLM.from_pretrained(folder).eval()
    processor = XComposerProcessor.for_model(model.config, InternLMTokenizer.from_pretrained(folder))
    image = torch.linspace(0, 1, 3 * 40 * 30).reshape(30, 40, 3).mul(255).to(torch.uint8).numpy()
    inputs = processor(text=["<ImageHere>Which colour?"], images=[np.asarray(image)])
    assert torch.equal(got["ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(**inputs).logits, rtol=1e-5, atol=1e-5)  # the parity bar; two processes may reduce in another order
