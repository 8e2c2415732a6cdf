"""Run the repository on several transformers (and torch) releases and check that each gives the pinned stack's numbers.

    python tests/version_matrix.py 4.45.2 4.57.6 5.0.0 5.24.0          # parity + the conformance tests
    python tests/version_matrix.py --full 4.45.2 5.10.4                 # parity + the whole test suite
    python tests/version_matrix.py 5.24.0+torch2.15.0                   # a release with another torch

Each release gets its own virtualenv under --venvs (kept between runs), made on top of this interpreter's
site-packages so that the pinned torch is reused: only transformers and what it pulls are installed there
(and torch itself for a `+torchX` entry). Every release then
- loads the fixture folders written once by this (pinned) interpreter and records logits, greedy, sampled
  and beam tokens with and without cache, a left-padded batch, streaming, chat, processor and tokenizer
  outputs, a save/load round trip, the converter's output and default_model's demo answers
  (tests/parity_probe.py); they must equal the pinned stack's: logits within 1e-5, tokens and texts identical
  (sampled tokens only under a torch whose seeded multinomial draws equal the pinned torch's: 2.4 draws otherwise);
- runs the conformance subset of the suite (or all of it with --full).
One line per release; the exit status is 0 only if every release is parity-exact and its tests pass.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from parity_probe import SAMPLER

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ATOL = 1e-5
# Converter against the independent upstream reference (v1, v2, and the HD models with their CLI contract),
# cache == no cache, batch == single, fresh-process save/load, chat, the embedded model and its demo.
CONFORMANCE = [
    "tests/test_hd_model.py::test_converted_model_matches_the_reference",
    "tests/test_hd_model.py::test_a_left_padded_batch_of_different_sizes_equals_single_runs",
    "tests/test_hd_convert.py::test_command_line_contract_convert_then_auto_classes",
    "tests/test_convert.py::test_converted_logits_equal_upstream",
    "tests/test_convert.py::test_greedy_generation_matches_upstream",
    "tests/test_convert.py::test_cli_output_loads_through_auto_classes_offline",
    "tests/test_modeling.py::test_cached_generation_equals_uncached",
    "tests/test_modeling.py::test_cached_forward_equals_full_forward",
    "tests/test_modeling.py::test_left_padded_batch_matches_each_prompt_alone",
    "tests/test_modeling.py::test_eager_and_sdpa_agree",
    "tests/test_auto_roundtrip.py",
    "tests/test_chat.py",
    "tests/test_default_model.py",
]


def environment(spec: str, venvs: str) -> tuple[str, str]:
    """(python of a virtualenv with that release, its label); `spec` is `X.Y.Z` or `X.Y.Z+torchA.B.C`."""
    transformers_version, _, torch_version = spec.partition("+torch")
    folder = os.path.join(venvs, f"tf-{spec}")
    python = os.path.join(folder, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", folder], check=True)
        packages = [f"transformers=={transformers_version}"] + ([f"torch=={torch_version}"] if torch_version else [])
        env = dict(os.environ)
        if torch_version:  # a machine-wide cap on torch (a pip constraints file) must not apply to this venv
            empty = os.path.join(folder, "no-constraints.txt")
            open(empty, "w").close()
            env["PIP_CONSTRAINT"] = empty
        done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"cannot install {packages}: {done.stderr[-1500:]}")
    return python, spec


def comparable(reference: dict, got: dict) -> dict:
    """The reference's records that `got` must reproduce: sampled tokens only where torch draws alike."""
    if got.get(SAMPLER) == reference[SAMPLER]:
        return reference
    return {key: value for key, value in reference.items() if not key.endswith("/sample") and key != SAMPLER}


def compare(reference: dict, got: dict) -> list[str]:
    """What differs between two parity records: logits beyond ATOL, anything else not equal (lists and strings
    from the first difference on)."""
    problems = []
    for key, expected in comparable(reference, got).items():
        if key not in got:
            problems.append(f"{key}: missing")
        elif torch.is_tensor(expected):
            value = got[key]
            if value.shape != expected.shape:
                problems.append(f"{key}: shape {tuple(value.shape)} != {tuple(expected.shape)}")
            elif (delta := (value.float() - expected.float()).abs().max().item()) > ATOL:
                problems.append(f"{key}: max |diff| {delta:.2e}")
        elif got[key] != expected:
            value, expected = str(got[key]), str(expected)
            start = next((i for i, (a, b) in enumerate(zip(value, expected)) if a != b), min(len(value), len(expected)))
            start = max(0, start - 20)
            problems.append(f"{key}: from character {start}: {value[start:start + 80]!r} != "
                            f"{expected[start:start + 80]!r}")
    return problems


def max_logit_difference(reference: dict, got: dict) -> float:
    deltas = [(got[k].float() - v.float()).abs().max().item() for k, v in reference.items()
              if torch.is_tensor(v) and k in got and got[k].shape == v.shape]
    return max(deltas, default=0.0)


def demo_score(lines: list[str]) -> str:
    """demo.py prints `XComposer2: <answer>    (drawn: <truth>)`: how many answers are the truth."""
    answers = [re.match(r"XComposer2: (.*?)\s+\(drawn: (.*)\)$", line) for line in lines if line.startswith("XComposer2:")]
    right = sum(bool(m) and m.group(1).strip().lower() == m.group(2).strip().lower() for m in answers)
    return f"{right}/{len(answers)}"


def run_tests(python: str, full: bool) -> str:
    selection = ["tests"] if full else CONFORMANCE
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    summary = re.sub(r"=+", "", summary).strip()
    if done.returncode:
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        summary += "\n      " + "\n      ".join(failed[:20])
    return ("ok " if done.returncode == 0 else "FAIL ") + summary


def versions_of(python: str) -> str:
    done = subprocess.run([python, "-c", "import torch, transformers; print(transformers.__version__, torch.__version__)"],
                          capture_output=True, text=True, check=True)
    transformers_version, torch_version = done.stdout.split()
    return f"transformers {transformers_version:<8} torch {torch_version:<12}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("releases", nargs="+", help="transformers releases, optionally +torchX.Y.Z")
    parser.add_argument("--full", action="store_true", help="run the whole suite, not the conformance subset")
    parser.add_argument("--no-tests", action="store_true", help="parity only")
    parser.add_argument("--venvs", default=os.path.join(ROOT, ".venvs"), help="where the virtualenvs are kept")
    args = parser.parse_args(argv)
    os.makedirs(args.venvs, exist_ok=True)
    probe = os.path.join(HERE, "parity_probe.py")
    all_good = True
    with tempfile.TemporaryDirectory() as work:
        fixtures, reference_file = os.path.join(work, "fixtures"), os.path.join(work, "reference.pt")
        subprocess.run([sys.executable, probe, "fixtures", fixtures], check=True, capture_output=True)
        subprocess.run([sys.executable, probe, "measure", fixtures, reference_file], check=True, capture_output=True)
        reference = torch.load(reference_file)
        print(f"reference: {versions_of(sys.executable)}(this interpreter); {len(reference)} recorded outputs",
              flush=True)
        for spec in args.releases:
            start = time.time()
            try:
                python, label = environment(spec, args.venvs)
            except RuntimeError as error:
                print(f"{spec:<24} cannot set up: {error}", flush=True)
                all_good = False
                continue
            out = os.path.join(work, f"{spec}.pt")
            done = subprocess.run([python, probe, "measure", fixtures, out], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode:
                parity, exact = "FAIL (the probe crashed: " + done.stderr.strip().splitlines()[-1][:200] + ")", False
            else:
                got = torch.load(out)
                problems = compare(reference, got)
                exact, compared = not problems, comparable(reference, got)
                unsampled = "" if compared is reference else "; sampled tokens not compared: this torch draws differently"
                parity = (f"parity exact (max |diff| {max_logit_difference(reference, got):.1e}, "
                          f"{len(compared)} outputs, demo {demo_score(got['default_model'])} right{unsampled})" if exact
                          else "parity FAIL: " + "; ".join(problems[:6]))
            tests = "" if args.no_tests else "  tests " + run_tests(python, args.full)
            all_good &= exact and ("FAIL" not in tests)
            print(f"{versions_of(python)} {parity}{tests}  [{time.time() - start:.0f} s]", flush=True)
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
