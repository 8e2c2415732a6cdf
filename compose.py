"""Write an illustrated article with InternLM-XComposer (v1 or XComposer2), or edit one.

Compose from an instruction, with images retrieved from a pool by a local CLIP:
    python compose.py MODEL_DIR "instruction" --pool DIR --clip CLIP_DIR --out OUT
or placing your own images (each used at most once, no retrieval):
    python compose.py MODEL_DIR "instruction" --images a.png b.png --out OUT
Edit a saved article (OUT.json) with XComposer2's operations:
    python compose.py MODEL_DIR --from OUT.json --edit rewrite --paragraph 2 --out OUT2

Writes OUT.md (images copied to OUT_files/), OUT.html (self-contained, images as data URIs) and
OUT.json (the article, reusable with --from). The article streams to stdout, progress to stderr.
"""

import argparse
import sys

import torch

EDITS = ("expand", "rewrite", "shorten", "insert")


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
    if args.pool and args.images:
        parser.error("give --pool or --images, not both")
    if args.pool and not args.clip:
        parser.error("--pool needs --clip CLIP_DIR")
    if args.edit and args.paragraph is None:
        parser.error("--edit needs --paragraph N")
    if args.edit == "insert" and not args.outline:
        parser.error("--edit insert needs --outline TEXT")
    return args


def progress(step: str, done: int, total: int) -> None:
    print(f"[{step}] {done}/{total}", file=sys.stderr, flush=True)


def load(model_dir: str, device: str, dtype: str | None):
    from modeling_xcomposer import XComposerForCausalLM
    from processing_xcomposer import XComposerProcessor
    from tokenization_internlm import InternLMTokenizer

    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    model = XComposerForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = InternLMTokenizer.from_pretrained(model_dir)
    return model, XComposerProcessor.for_model(model.config, tokenizer)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import TextStreamer

    from composition import Article, ClipRetriever, Composer

    torch.manual_seed(args.seed)
    model, processor = load(args.model_dir, args.device, args.dtype)
    retriever = ClipRetriever(args.clip, args.cache_dir, device=args.device) if args.pool else None
    sampling = dict(do_sample=True, top_p=0.8, top_k=40, repetition_penalty=1.005) if args.sample else {}
    composer = Composer(model, processor, retriever, pool_dir=args.pool, top_k=args.top_k, progress=progress,
                        generation_kwargs=sampling)
    if args.from_json:
        article = Article.from_json(args.from_json)
    else:
        if retriever is not None:
            print("[index] embedding the image pool", file=sys.stderr, flush=True)
            retriever.index(args.pool)
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        article = composer.compose(args.instruction, args.num_images, args.images, args.max_new_tokens, streamer)
        print(file=sys.stdout, flush=True)
    if args.edit == "expand":
        composer.expand(article, args.paragraph, args.material)
    elif args.edit == "insert":
        composer.insert(article, args.paragraph, args.outline)
    elif args.edit:
        getattr(composer, args.edit)(article, args.paragraph)

    article.to_json(args.out + ".json")
    md = article.to_markdown(args.out + ".md")
    page = article.to_html(args.out + ".html")
    placed = sum(section.image is not None for section in article.sections)
    print(f"wrote {md} and {page}: {len(article.sections)} paragraphs, {placed} images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
