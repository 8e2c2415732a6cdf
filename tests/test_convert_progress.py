"""Long conversions show a tqdm bar on stderr, over the bytes written, as huggingface_hub does for downloads;
none with --quiet, with HF_HUB_DISABLE_PROGRESS_BARS=1, or when stderr is not a terminal."""

import io
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from convert_helpers import read_tensors, read_upstream_bins, upstream_config, write_upstream
from upstream_reference import make_upstream_state_dict

import convert_checkpoint as cc


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An upstream checkpoint and its conversion (with a tokenizer, so the converter has no notes to print)."""
    root = tmp_path_factory.mktemp("progress")
    config = upstream_config(2)
    write_upstream(root / "upstream", 2, sd=make_upstream_state_dict(config), config=config)
    assert cc.main([str(root / "upstream"), str(root / "ours"), "--quiet"]) == 0
    return root


def in_bytes(size: str) -> float:
    """tqdm's '1.85M' (unit_divisor 1024) -> bytes."""
    scale = {"k": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(size[-1], 1)
    return float(size.rstrip("kMG")) * scale


def run_on(stderr, monkeypatch, argv):
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cc.main([str(a) for a in argv]) == 0
    return stderr.getvalue()


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_terminal_gets_a_bar_over_the_bytes_written(folders, tmp_path, monkeypatch, command):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    args = [folders / "upstream", tmp_path / "dst"] if command == "convert" else \
        ["--to", "upstream", folders / "ours", tmp_path / "dst"]
    err = run_on(FakeTerminal(), monkeypatch, args)
    final = err.split("\r")[-1]
    assert final.startswith(f"writing {tmp_path / 'dst'}: 100%|") and final.endswith("\n"), err
    tensors = read_tensors(tmp_path / "dst") if command == "convert" else read_upstream_bins(tmp_path / "dst")
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    done, total = re.search(r"\| *([\d.]+[kMG]?)/([\d.]+[kMG]?) ", final).groups()
    assert done == total and abs(in_bytes(total) - written) < 0.01 * written, (final, written)


@pytest.mark.parametrize("quiet", ["--quiet", "HF_HUB_DISABLE_PROGRESS_BARS=1", "not a terminal"])
def test_no_bar_when_asked_or_when_stderr_is_not_a_terminal(folders, tmp_path, monkeypatch, quiet):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    args, stderr = [folders / "upstream", tmp_path / "dst"], FakeTerminal()
    if quiet == "--quiet":
        args.append("--quiet")
    elif quiet.startswith("HF_HUB"):
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    else:
        stderr = io.StringIO()  # isatty() is False, like a pipe or a log file
    assert run_on(stderr, monkeypatch, args) == ""
    assert os.path.isfile(tmp_path / "dst" / "model.safetensors")


@pytest.mark.slow
def test_a_piped_command_line_prints_only_its_summary(folders, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), str(folders / "upstream"),
                          str(tmp_path / "dst")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.startswith("converted 70 tensors") and run.stdout.count("\n") == 1
