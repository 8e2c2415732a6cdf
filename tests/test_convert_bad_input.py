"""Bad input never hangs, destroys or crashes the converter: every case gets one `error:` line naming the problem,
exit status 1 (or the signal's status), an untouched source and no leftover folder. Cases that used to hang
run in a fresh process under a hard timeout."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from convert_helpers import assert_no_leftovers, snapshot, upstream_config, write_upstream
from transformers import CLIPVisionConfig, CLIPVisionModel
from upstream_reference import make_upstream_state_dict, write_upstream_checkpoint

import checkpoint_io
import convert_checkpoint as cc

HANG_TIMEOUT = 240  # generous: a fresh interpreter imports torch and transformers; a hang never ends


def refused(capsys, argv, src, out, *needles, status=1, expected=()):
    """Run the command in-process and check the exact outcome; returns stderr."""
    before = snapshot(src)
    assert cc.main([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    assert snapshot(src) == before
    assert_no_leftovers(out, expected)
    return err


def edited_upstream(folder, version=2, sd_edit=None, **config_edits):
    """A tiny upstream checkpoint whose tensors are right and whose config.json says `config_edits`."""
    config = upstream_config(version)
    sd = make_upstream_state_dict(config)
    if sd_edit:
        sd_edit(sd)
    write_upstream(folder, version, sd=sd, config=config)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config_edits}))
    return folder


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


# --------------------------------------------------------------------------- configs that lie or make no sense


CONFIG_CASES = {  # case: (version, config.json edits, what the error names)
    "hidden_size_zero": (2, {"hidden_size": 0}, "config.json: hidden_size must be a positive integer, got 0"),
    "hidden_size_zero_v1": (1, {"hidden_size": 0}, "config.json: hidden_size must be a positive integer, got 0"),
    "hidden_size_string": (2, {"hidden_size": "64"}, "config.json: hidden_size must be a positive integer, got '64'"),
    "heads_zero": (2, {"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    "rope_scaling_string": (2, {"rope_scaling": "x"}, "config.json: rope_scaling must be an object or null, got 'x'"),
    "max_position_negative": (2, {"max_position_embeddings": -1},
                              "config.json: max_position_embeddings must be a positive integer, got -1"),
    "img_size_negative": (2, {"img_size": -56}, "config.json: img_size must be a positive integer, got -56"),
    "img_size_not_the_table": (2, {"img_size": 56}, "config.json: img_size is 56, but the stored position table is "
                                                    "for 28 px"),
    "hidden_size_lies": (2, {"hidden_size": 128}, "config.json: hidden_size is 128, but the tensors hold 64"),
    "intermediate_lies_v1": (1, {"intermediate_size": 4096}, "config.json: intermediate_size is 4096, but the tensors "
                                                             "hold 128"),
    "kv_heads_lie": (2, {"num_key_value_heads": 4}, "num_key_value_heads 4 do not fit"),
    "lora_rank_missing_v1": (1, {"internlm_lora": {"lora_alpha": 8, "learn_param": ["q"]}},
                             "config.json: internlm_lora: lora_r must be a positive integer, got None"),
    "unknown_activation": (2, {"hidden_act": "swish2"}, "config.json: unknown hidden_act 'swish2'"),
    "architectures_not_a_list": (2, {"architectures": "InternLMXComposer2ForCausalLM"}, "architectures"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_upstream_config_is_an_error_naming_the_field(tmp_path, out, capsys, case):
    version, edits, message = CONFIG_CASES[case]
    src = edited_upstream(tmp_path / "src", version, **edits)
    refused(capsys, [src, out / "dst"], src, out, message)


def test_weight_map_entry_that_is_not_a_file_name(tmp_path, out, capsys):
    src = edited_upstream(tmp_path / "src")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = ["pytorch_model-00001-of-00002.bin"]
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    refused(capsys, [src, out / "dst"], src, out, "pytorch_model.bin.index.json", "not a file name",
            "model.norm.weight")


def test_tokenizer_model_that_is_a_folder(tmp_path, out, capsys):
    src = edited_upstream(tmp_path / "src")
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.model").mkdir()
    refused(capsys, [src, out / "dst"], src, out, f"{src / 'tokenizer.model'} is not a regular file")


def test_export_of_a_folder_whose_tokenizer_model_is_a_folder(tmp_path, out, capsys):
    src = edited_upstream(tmp_path / "src")
    assert cc.main([str(src), str(tmp_path / "ours")]) == 0
    ours = tmp_path / "ours"
    (ours / "tokenizer.model").unlink()
    (ours / "tokenizer.model").mkdir()
    refused(capsys, ["--to", "upstream", ours, out / "up"], ours, out, "tokenizer.model is not a regular file")


# --------------------------------------------------------------------------- cases that used to hang


def run_cli(*args, cwd):
    """The command in a fresh process with a hard timeout (a hang fails the test instead of stalling it)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _stray_layer(sd):
    sd["model.layers.999999999.ffn_norm.weight"] = sd["model.layers.0.ffn_norm.weight"].clone()


def _llm_folder(tmp_path):
    """An InternLM2 checkpoint (the decoder of a tiny XComposer2) plus a CLIP folder, for --from-components."""
    config = upstream_config(2)
    sd = {k: v for k, v in make_upstream_state_dict(config).items()
          if k.startswith(("model.", "output.")) and ".Plora_" not in k}
    llm_config = {k: v for k, v in config.items() if k != "img_size"} | {"model_type": "internlm2"}
    write_upstream_checkpoint(tmp_path / "llm", llm_config, sd)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14)).save_pretrained(tmp_path / "clip")
    return tmp_path / "llm", tmp_path / "clip"


def _set_json(path, **edits):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **edits}))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["upstream_layers", "stray_layer_index", "ours_layers", "components_llm_layers",
                                  "components_clip_layers", "config_is_a_fifo"])
def test_configs_that_used_to_hang_fail_fast(tmp_path, case):
    (tmp_path / "out").mkdir()
    if case == "upstream_layers":
        src = edited_upstream(tmp_path / "src", num_hidden_layers=10 ** 9)
        args, message = [src], "config.json: num_hidden_layers is 1000000000, but the tensors hold 2"
    elif case == "stray_layer_index":
        src = edited_upstream(tmp_path / "src", sd_edit=_stray_layer)
        args, message = [src], "layer indices under model.layers.* are not 0..2"
    elif case == "ours_layers":
        assert cc.main([str(edited_upstream(tmp_path / "up")), str(tmp_path / "src")]) == 0
        src = tmp_path / "src"
        cfg = json.loads((src / "config.json").read_text())
        cfg["text_config"]["num_hidden_layers"] = 10 ** 9
        (src / "config.json").write_text(json.dumps(cfg))
        args, message = ["--to", "upstream", src], "text_config.num_hidden_layers is 1000000000, but the tensors hold 2"
    elif case.startswith("components"):
        llm, clip = _llm_folder(tmp_path)
        _set_json((llm if case == "components_llm_layers" else clip) / "config.json", num_hidden_layers=10 ** 9)
        src = tmp_path
        args, message = ["--from-components", "--llm", llm, "--vision", clip], "num_hidden_layers is 1000000000"
    else:
        src = edited_upstream(tmp_path / "src")
        (src / "config.json").unlink()
        os.mkfifo(src / "config.json")  # opening it for reading would wait for a writer forever
        args, message = [src], "config.json is missing or not a regular file"
    before = snapshot(src)
    run = run_cli(*args, tmp_path / "out" / "dst", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr and message in run.stderr, run.stderr
    assert snapshot(src) == before
    assert_no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------- the source is never replaced


def _layout(tmp_path, case):
    """(SRC, DST, what is to stay untouched) for a destination that is, is inside or contains the source."""
    real = edited_upstream(tmp_path / "data" / "model")
    if case == "src_is_a_link_to_dst":
        os.symlink(real, tmp_path / "link")
        return tmp_path / "link", real, "is the source"
    if case == "dst_is_a_link_to_src":
        os.symlink(real, tmp_path / "link")
        return real, tmp_path / "link", "is the source"
    if case == "dst_inside_src":
        return real, real / "converted", "is inside the source"
    if case == "src_inside_dst":
        return real, tmp_path / "data", "which lies inside it"
    os.symlink(tmp_path / "data", tmp_path / "alias")  # src_inside_dst_through_a_link
    return tmp_path / "alias" / "model", tmp_path / "data", "which lies inside it"


@pytest.mark.parametrize("case", ["src_is_a_link_to_dst", "dst_is_a_link_to_src", "dst_inside_src", "src_inside_dst",
                                  "src_inside_dst_through_a_link"])
def test_destination_that_would_replace_the_source_is_refused_even_with_force(tmp_path, capsys, case):
    src, dst, message = _layout(tmp_path, case)
    before, listing = snapshot(tmp_path / "data"), sorted(os.listdir(tmp_path))
    assert cc.main([str(src), str(dst), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the destination") and message in err, err
    assert snapshot(tmp_path / "data") == before and sorted(os.listdir(tmp_path)) == listing
    assert os.path.isfile(tmp_path / "data" / "model" / "config.json")


# --------------------------------------------------------------------------- writing fails, or is interrupted


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, out, capsys, monkeypatch):
    src = edited_upstream(tmp_path / "src")
    (out / "dst").mkdir()
    (out / "dst" / "keep.txt").write_text("precious")

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a partial shard, as a real full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io, "save_file", full_disk)
    refused(capsys, [src, out / "dst", "--force"], src, out, f"cannot write {out / 'dst'}: No space left on device",
            expected=["dst"])
    assert os.listdir(out / "dst") == ["keep.txt"]  # the previous folder is left as it was
    refused(capsys, [src, out / "new"], src, out, "No space left on device", expected=["dst"])


CHILD = r"""
import os, signal, sys, time
# Ctrl-C as in a terminal: a job started in the background without job control (or under nohup) inherits
# SIGINT ignored, and the converter rightly leaves that as it is.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
import checkpoint_io, convert_checkpoint
src, dst, marker = sys.argv[2:]
add = checkpoint_io.ShardWriter.add

def add_then_wait(self, name, tensor):  # a conversion caught in the middle of writing DST
    add(self, name, tensor)
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(HANG)

checkpoint_io.ShardWriter.add = add_then_wait
sys.exit(convert_checkpoint.main([src, dst]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_while_writing_removes_the_staged_folder(tmp_path, signum):
    src, out, marker = edited_upstream(tmp_path / "src"), tmp_path / "out", tmp_path / "writing"
    out.mkdir()
    before = snapshot(src)
    child = subprocess.Popen([sys.executable, "-c", CHILD.replace("HANG", str(HANG_TIMEOUT)), ROOT, str(src),
                              str(out / "dst"), str(marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + HANG_TIMEOUT
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.communicate(timeout=10)
        staged = os.listdir(out)
        assert len(staged) == 1 and staged[0].startswith(".dst.") and staged[0].endswith(".tmp"), staged
        child.send_signal(signum)
        _, err = child.communicate(timeout=HANG_TIMEOUT)
    finally:
        child.kill()
        child.wait()
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert child.returncode == 128 + signum, err
    assert err.startswith(f"error: interrupted ({name}); nothing was written to {out / 'dst'}"), err
    assert "Traceback" not in err
    assert_no_leftovers(out)
    assert snapshot(src) == before


@pytest.mark.parametrize("command", ["convert", "export"])
def test_output_gets_the_users_umask(tmp_path, command):
    """Not tempfile.mkdtemp's 0700, nor the 0600 that safetensors gives its files."""
    src = edited_upstream(tmp_path / "src")
    previous = os.umask(0o027)
    try:
        if command == "export":
            assert cc.main([str(src), str(tmp_path / "ours")]) == 0
            assert cc.main(["--to", "upstream", str(tmp_path / "ours"), str(tmp_path / "dst")]) == 0
        else:
            assert cc.main([str(src), str(tmp_path / "dst"), "--max-shard-size", "500KB"]) == 0
    finally:
        os.umask(previous)
    dst = tmp_path / "dst"
    assert oct(dst.stat().st_mode & 0o777) == oct(0o750)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in dst.iterdir()}
    assert any(name.endswith((".safetensors", ".bin")) for name in modes)
    assert set(modes.values()) == {oct(0o640)}, modes
