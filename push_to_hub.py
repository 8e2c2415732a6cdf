"""Upload a model folder to the Hugging Face Hub, after checking that it is complete.

    python push_to_hub.py FOLDER REPO_ID [--private] [--revision BRANCH] [--create-pr] [--message TEXT]

The token comes from the usual places (HF_TOKEN, or `hf auth login`) and is never printed.
A folder without a model card (one made by model.save_pretrained + processor.save_pretrained) gets one
written from its config. An incomplete folder (missing config, code, tokenizer, processor or weights) is
refused; an unreachable Hub or a refused upload is one `error:` line.
"""

import argparse
import contextlib
import importlib
import json
import os
import sys

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configuration_xcomposer import XComposerConfig  # noqa: E402
from model_folder import check_model_folder, write_model_card  # noqa: E402


def _unreachable_errors() -> tuple[type[Exception], ...]:
    """What the Hub client raises when it cannot reach the Hub: httpx2's or httpx's transport errors
    (huggingface_hub 1 and later), requests' connection errors and timeouts (earlier releases)."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


UNREACHABLE = _unreachable_errors()


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def write_missing_card(folder: str, repo_id: str) -> bool:
    """Writes README.md from the folder's config when the folder has an XComposer config but no card."""
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(os.path.join(folder, "README.md")) or not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            if json.load(f).get("model_type") != XComposerConfig.model_type:
                return False
    except (OSError, ValueError):  # the completeness check names a config it cannot read
        return False
    write_model_card(folder, XComposerConfig.from_pretrained(folder), repo_id=repo_id)
    return True


def push(folder: str, repo_id: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         message: str | None = None, api: HfApi | None = None) -> str:
    if write_missing_card(folder, repo_id):
        print(f"wrote the model card {os.path.join(folder, 'README.md')} from config.json (the folder had none)")
    problems = check_model_folder(folder)
    if problems:
        raise ValueError(f"refusing to upload {folder}, it is incomplete:\n  " + "\n  ".join(problems))
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                             commit_message=message or f"Upload {os.path.basename(os.path.abspath(folder))}")
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    try:
        url = push(args.folder, args.repo_id, args.private, args.revision, args.create_pr, args.message)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OfflineModeIsEnabled:
        print("error: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push", file=sys.stderr)
        return 1
    except LocalTokenNotFoundError:
        print("error: no Hugging Face token found; set HF_TOKEN or run `hf auth login`", file=sys.stderr)
        return 1
    except UNREACHABLE as error:  # refused, unresolvable, timed out: where and why, not a traceback
        print(f"error: cannot reach the Hub at {constants.ENDPOINT}: {_first_line(error)}", file=sys.stderr)
        return 1
    except (HfHubHTTPError, OSError) as error:  # permission, quota, a file that vanished: the message
        print(f"error: upload failed: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
        return 1
    print(f"uploaded {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
