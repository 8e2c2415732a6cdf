"""Write an illustrated article with InternLM-XComposer (v1 or XComposer2), or edit one.

Compose from an instruction, with images retrieved from a pool by a local CLIP:
    python compose.py MODEL_DIR "instruction" --pool DIR --clip CLIP_DIR --out OUT
or placing your own images (each used at most once, no retrieval):
    python compose.py MODEL_DIR "instruction" --images a.png b.png --out OUT
Edit a saved article (OUT.json) with XComposer2's operations:
    python compose.py MODEL_DIR --from OUT.json --edit rewrite --paragraph 2 --out OUT2

Writes OUT.md (images copied to OUT_files/), OUT.html (self-contained, images as data URIs) and
OUT.json (the article, naming the copies in OUT_files/; reusable with --from). The article streams to
stdout; progress bars go to stderr when it is a terminal (--quiet: none). Unreadable inputs (an --images
file, a --from article, an --out folder that does not exist) are reported before the model loads.
"""

import argparse
import os
import sys
import warnings

import torch

from composition import EDITS, Article, ClipRetriever, Composer, CompositionWarning, image_problems, progress_bar


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compose.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="saved XComposer model folder (config, weights, tokenizer.model)")
    parser.add_argument("instruction", nargs="?",
                        help="title, outline or material for the article (omit with --from)")
    parser.add_argument("--out", required=True, help="output base name: writes OUT.md, OUT.html and OUT.json")
    source = parser.add_argument_group("images")
    source.add_argument("--pool", help="folder of candidate images, searched by CLIP text-image similarity")
    source.add_argument("--clip", help="local CLIP folder (CLIPModel + CLIPProcessor), needed with --pool")
    source.add_argument("--cache-dir", help="where pool embeddings are cached (default ~/.cache/xcomposer-compose)")
    source.add_argument("--top-k", type=int, default=4, help="candidates retrieved per image (default 4)")
    source.add_argument("--images", nargs="+", default=[],
                        help="your own images: the model places them, each at most once (no --pool)")
    source.add_argument("--num-images", type=int,
                        help="images to place (default: the number of --images, else 4; 0 for text only)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=1024, help="article length limit in tokens (default 1024)")
    gen.add_argument("--sample", action="store_true", help="sample (top_p 0.8, top_k 40) instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device (default cuda when available, else cpu)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars and no summary line on stderr")
    edit = parser.add_argument_group("editing (XComposer2 operations, applied after composing or to --from)")
    edit.add_argument("--from", dest="from_json", help="edit this saved article (OUT.json) instead of composing")
    edit.add_argument("--edit", choices=EDITS,
                      help="expand, rewrite or shorten paragraph --paragraph, or insert a paragraph after it")
    edit.add_argument("--paragraph", type=int, help="paragraph index (0-based) for --edit")
    edit.add_argument("--material", default="", help="material to expand from (--edit expand)")
    edit.add_argument("--outline", default="", help="outline of the inserted paragraph (--edit insert)")
    args = parser.parse_args(argv)

    if args.from_json is None and not args.instruction:
        parser.error("give an instruction, or --from ARTICLE.json to edit a saved article")
    if args.from_json is not None and (args.instruction or args.pool or args.images):
        parser.error("--from edits a saved article: give no instruction, --pool or --images with it")
    if args.pool and args.images:
        parser.error("give --pool or --images, not both")
    if args.pool and not args.clip:
        parser.error("--pool needs --clip CLIP_DIR")
    if args.edit and args.paragraph is None:
        parser.error("--edit needs --paragraph N")
    if args.edit == "insert" and not args.outline:
        parser.error("--edit insert needs --outline TEXT")
    if args.outline and args.edit != "insert":
        parser.error("--outline goes with --edit insert")
    if args.material and args.edit != "expand":
        parser.error("--material goes with --edit expand")
    return args


def input_problems(args: argparse.Namespace, article: Article | None) -> list[str]:
    """What would stop the run after the model has loaded, found before it does."""
    problems = [] if os.path.isdir(args.model_dir) else [f"the model folder {args.model_dir!r} does not exist"]
    folder = os.path.dirname(os.path.abspath(args.out))
    if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        example = os.path.join(args.out, "article")
        problems.append(f"--out {args.out!r} is a folder; give a base name such as {example!r}")
    elif not os.path.isdir(folder):
        problems.append(f"--out {args.out!r}: the folder {folder} does not exist")
    if args.pool and not os.path.isdir(args.pool):
        problems.append(f"--pool {args.pool!r} is not a folder")
    if args.clip and not os.path.isdir(args.clip):
        problems.append(f"--clip {args.clip!r} is not a folder")
    problems += image_problems(args.images)
    if article is not None:
        problems += image_problems([section.image for section in article.sections if section.image])
    return problems


class StepBars:
    """Composer's `progress(step, done, total)` as a tqdm bar per step on stderr; none for `write`, whose
    article streams to stdout."""

    def __init__(self, show: bool | None):
        self.show, self.step, self.bar = show, None, None

    def __call__(self, step: str, done: int, total: int) -> None:
        if step == "write":
            return
        if step != self.step:
            self.close()
            self.step, self.bar = step, progress_bar(self.show, total=total, desc=step, unit="call")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.step = self.bar = None


def load(model_dir: str, device: str, dtype: str | None):
    from modeling_xcomposer import XComposerForCausalLM
    from processing_xcomposer import XComposerProcessor
    from tokenization_internlm import InternLMTokenizer
    from transformers_compat import DTYPE_ARG

    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    model = XComposerForCausalLM.from_pretrained(model_dir, **{DTYPE_ARG: getattr(torch, dtype)}).to(device).eval()
    tokenizer = InternLMTokenizer.from_pretrained(model_dir)
    return model, XComposerProcessor.for_model(model.config, tokenizer)


def fail(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        article = Article.load(args.from_json) if args.from_json else None
    except ValueError as error:
        return fail([str(error)])
    if args.edit and article is not None and not 0 <= args.paragraph < len(article.sections):
        return fail([f"--paragraph {args.paragraph}: the article has {len(article.sections)} paragraphs"])
    problems = input_problems(args, article)
    if problems:
        return fail(problems)
    from transformers.utils import logging

    show = False if args.quiet else None
    bars = logging.is_progress_bar_enabled()
    if args.quiet or not sys.stderr.isatty():  # transformers' loading bars too, on its own switch
        logging.disable_progress_bar()
    try:
        return run(args, article, show)
    finally:
        if bars:
            logging.enable_progress_bar()


def run(args: argparse.Namespace, article: Article | None, show: bool | None) -> int:
    """The model calls and the output, once every input has been checked."""
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    model, processor = load(args.model_dir, args.device, args.dtype)
    retriever = ClipRetriever(args.clip, args.cache_dir, device=args.device, progress=show) if args.pool else None
    sampling = dict(do_sample=True, top_p=0.8, top_k=40, repetition_penalty=1.005) if args.sample else {}
    composer = Composer(model, processor, retriever, pool_dir=args.pool, top_k=args.top_k, progress=StepBars(show),
                        generation_kwargs=sampling)
    if article is None:
        if retriever is not None:
            retriever.index(args.pool)
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        article = composer.compose(args.instruction, args.num_images, args.images, args.max_new_tokens, streamer)
        print(file=sys.stdout, flush=True)
    unedited = None
    if args.edit:
        try:
            composer.edit(args.edit, article, args.paragraph, material=args.material, outline=args.outline)
        except IndexError as error:  # only known once the article is written: keep it, unedited
            unedited = f"--paragraph: {error}; the article is saved without the edit"
    try:
        written = article.save(args.out)
    except OSError as error:
        return fail([f"cannot write {args.out}.*: {error}"])
    if unedited:
        return fail([unedited])
    if not args.quiet:
        placed = sum(section.image is not None for section in article.sections)
        print(f"wrote {', '.join(map(str, written))}: {len(article.sections)} paragraphs, {placed} images",
              file=sys.stderr)
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, CompositionWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


if __name__ == "__main__":
    _python_format_warning, warnings.formatwarning = warnings.formatwarning, _format_warning
    sys.exit(main())
