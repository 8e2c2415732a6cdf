#!/usr/bin/env python
"""Convert InternLM-XComposer checkpoints to this repository's format, and back: the one command.

    python convert_checkpoint.py SRC DST                      # upstream XComposer v1 / XComposer2 -> ours
    python convert_checkpoint.py --to upstream SRC DST        # ours -> upstream layout (.bin shards)
    python convert_checkpoint.py --from-components --llm DIR --vision DIR [--img-size 490] DST   # fresh v2
    python convert_checkpoint.py --from-components --llm DIR --eva FILE --qformer FILE DST        # fresh v1

The work is done by flat modules, one per feature: convert_upstream.py (upstream -> ours: key tables, layout
fixes, sizes from config.json checked against the tensors), convert_components.py (fresh models),
export_upstream.py (ours -> upstream, with the inverse fixes) and checkpoint_io.py (reading untrusted files,
the meta-device dry run, staged sharded writes, progress bars). Untrusted input is read safely: weights with
torch.load(weights_only=True, mmap=True) or safetensors, configs as JSON; nothing from SRC is executed. Every
problem is an `error:` line and exit status 1; DST appears only when complete, and an interruption (Ctrl-C,
SIGTERM) leaves nothing behind.
"""

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the flat modules beside this script

from checkpoint_io import DEFAULT_SHARD_SIZE, DTYPES, ConversionError, ConversionResult  # noqa: E402
from convert_components import convert_components  # noqa: E402
from convert_upstream import convert_upstream  # noqa: E402
from export_upstream import export_upstream  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert InternLM-XComposer (v1 / XComposer2) checkpoints to and from this repository's format.")
    parser.add_argument("src", nargs="?", help="the source folder (omit with --from-components)")
    parser.add_argument("dst", help="the folder to write (must not exist unless --force)")
    parser.add_argument("--to", choices=("ours", "upstream"), default="ours",
                        help="'ours' (default): upstream -> ours; 'upstream': ours -> the upstream layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 5GB or 500MB")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal or with "
                             "HF_HUB_DISABLE_PROGRESS_BARS=1)")
    parser.add_argument("--lora-rank", type=int,
                        help="--to upstream: rank of the zero LoRA matrices written where upstream expects them "
                             "(default 256); --from-components: rank of the fresh (Partial) LoRA "
                             "(default 256 for XComposer2, none for v1)")
    components = parser.add_argument_group("a fresh model from raw component checkpoints")
    components.add_argument("--from-components", action="store_true")
    components.add_argument("--llm", metavar="DIR", help="InternLM2 (XComposer2) or InternLM (v1) HF folder")
    components.add_argument("--vision", metavar="DIR", help="transformers CLIPVisionModel folder (XComposer2)")
    components.add_argument("--eva", metavar="FILE", help="EVA ViT-g state dict, BLIP-2 key layout (v1)")
    components.add_argument("--qformer", metavar="FILE", help="BLIP-2 Q-Former state dict (v1)")
    components.add_argument("--img-size", type=int, help="image size (default: the vision tower's)")
    components.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation")
    return parser


def run(args) -> ConversionResult:
    if args.from_components:
        if args.src is not None or not args.llm:
            raise ConversionError("--from-components takes --llm (and --vision, or --eva and --qformer) and DST only")
        return convert_components(args.dst, args.llm, args.vision, args.eva, args.qformer, args.img_size,
                                  args.lora_rank, args.dtype, args.max_shard_size, args.force, args.seed, args.quiet)
    if args.src is None:
        raise ConversionError("give SRC and DST")
    if args.llm or args.vision or args.eva or args.qformer or args.img_size is not None:
        raise ConversionError("--llm/--vision/--eva/--qformer/--img-size need --from-components")
    if args.to == "upstream":
        lora_rank = 256 if args.lora_rank is None else args.lora_rank
        return export_upstream(args.src, args.dst, args.dtype, args.max_shard_size, args.force, lora_rank, args.quiet)
    if args.lora_rank is not None:
        raise ConversionError("--lora-rank needs --to upstream or --from-components")
    return convert_upstream(args.src, args.dst, args.dtype, args.max_shard_size, args.force, args.quiet)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the staged output folder is removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        result = run(args)
    except (ConversionError, OSError) as err:  # OSError: e.g. an unreadable file; DST is left untouched either way
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        name = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        print(f"error: interrupted ({name}); nothing was written to {args.dst}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
