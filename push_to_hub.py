"""Upload a model folder to the Hugging Face Hub, after checking that it is complete.

    python push_to_hub.py FOLDER REPO_ID [--private] [--revision BRANCH] [--create-pr] [--message TEXT]

The token comes from the usual places (HF_TOKEN, or `hf auth login`) and is never printed.
An incomplete folder (missing config, code, tokenizer, processor, model card or weights) is refused.
"""

import argparse
import os
import sys

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_folder import check_model_folder  # noqa: E402


def push(folder: str, repo_id: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         message: str | None = None, api: HfApi | None = None) -> str:
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
    except (HfHubHTTPError, OSError) as error:  # network, permission, quota: the message, not a traceback
        print(f"error: upload failed: {type(error).__name__}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"uploaded {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
