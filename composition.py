"""Interleaved text-image composition: from an instruction to an illustrated article.

The pipeline of the published demos, for both generations:
1. write the article (the instruction as a user turn, streamed);
2. split it into indexed paragraphs (`<Seg{i}> {text}\\n`, at most 60) and ask where images belong
   (prefilled `适合插入图像的行是`), then for a caption at each place (prefilled `标题是"`);
3. retrieve candidates for each caption from an image pool by CLIP text-image similarity;
4. let the model pick one candidate (prefilled `最合适的图是`), with the preceding text and images as
   context. With the user's own images, it picks among those not used yet, without retrieval.
Plus XComposer2's editing operations (expand, rewrite, shorten, insert a paragraph) and Markdown / HTML / JSON
output (`Article.save`, `Article.load`).

Prompt building and answer parsing are pure functions; `Composer` makes the model calls. A malformed
answer never stops the article: the parser warns (`CompositionWarning`) and falls back. Untrusted input is
contained: an unreadable pool image is skipped with a warning, the embedding cache is never unpickled and a
damaged one is rebuilt, the Markdown shows the model's text as text (no tags, no links), and a saved article
whose images lie outside its folder is refused.
"""

import base64
import contextlib
import hashlib
import html
import io
import json
import os
import re
import shutil
import sys
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model_folder import staged_folder
from processing_xcomposer import IMAGE_PLACEHOLDER, XComposerProcessor, load_image

MAX_PARAGRAPHS = 60  # upstream's max_section
SPOT_PREFILL = "适合插入图像的行是"
CAPTION_PREFILL = '标题是"'
SELECT_PREFILL = "最合适的图是"
SELECT_HEAD = "根据给定上下文和候选图像，选择合适的配图："
SEG_PATTERN = re.compile(r"<Seg([0-9]*)>")  # upstream's `<Seg[0-9]*>`, digits captured
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EDIT_HEADS = {"expand": "扩写以下段落：", "rewrite": "改写以下段落：", "shorten": "缩写以下段落："}
EDITS = (*EDIT_HEADS, "insert")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class CompositionWarning(UserWarning):
    """A model answer could not be used as is; the composition went on with a fallback."""


def _warn(message: str) -> None:
    warnings.warn(message, CompositionWarning, stacklevel=3)


def progress_bar(show: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr: with `show=None` only when stderr is a terminal, never with False, always with True."""
    return tqdm(file=sys.stderr, disable=None if show is None else not show, **kwargs)


def read_image(path) -> Image.Image:
    """`processing_xcomposer.load_image` for a file that may hold anything: every way it fails to decode, a
    decompression bomb included, is a ValueError naming the file."""
    try:
        return load_image(path)
    except (Image.DecompressionBombError, SyntaxError) as err:  # PIL raises these past load_image's net
        raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err


def image_problems(paths: Sequence) -> list[str]:
    """One message for each path that is not a readable image; empty when all are."""
    problems = []
    for path in paths:
        try:
            read_image(path)
        except ValueError as err:
            problems.append(str(err))
    return problems


@contextlib.contextmanager
def replacing(path: Path):
    """A fresh temporary path in `path`'s folder that replaces `path` (os.replace) when the block completes and
    is removed when it fails, so a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------- prompts (pure) ---------------


def split_paragraphs(article: str, max_paragraphs: int = MAX_PARAGRAPHS) -> list[str]:
    """Upstream: blank lines collapse, one paragraph per line, at most `max_paragraphs`."""
    text = re.sub(r"(\n\s*)+", "\n", article.strip())
    return [line for line in text.split("\n") if line.strip()][:max_paragraphs]


def indexed(paragraphs: Sequence[str]) -> list[str]:
    return [f"<Seg{i}> {text}\n" for i, text in enumerate(paragraphs)]


def _image_prefix(num_images: int) -> str:
    # upstream: ('<image> ' * n).strip() in front of the text
    return " ".join([IMAGE_PLACEHOLDER] * num_images)


def article_prompt(instruction: str, num_user_images: int = 0) -> str:
    return _image_prefix(num_user_images) + instruction


def spotting_prompt(paragraphs: Sequence[str], num_images: int, num_user_images: int = 0) -> str:
    article = "".join(indexed(paragraphs))
    return _image_prefix(num_user_images) + f'给定文章"{article}" 根据上述文章，选择适合插入图像的{num_images}行'


def earlier_captions(captions: Sequence[tuple[int, str]]) -> str:
    """`现在<Seg{p}>后插入图像对应的标题是"{c}"， <Seg{q}>...，` with the last `， ` turned into `。`."""
    if not captions:
        return ""
    parts = [f'<Seg{p}>后插入图像对应的标题是"{c}"， ' for p, c in captions]
    return ("现在" + "".join(parts))[:-2] + "。"


def caption_prompt(paragraphs: Sequence[str], location: int, earlier: Sequence[tuple[int, str]] = ()) -> str:
    """The article up to the paragraph after the location (upstream `text_sections[:p + 2]`)."""
    article = "".join(indexed(paragraphs)[: location + 2])
    return f'给定文章"{article}" {earlier_captions(earlier)}给出适合在<Seg{location}>后插入的图像对应的标题。'


def selection_prompt(paragraphs: Sequence[str], location: int, chosen: Sequence[int], num_candidates: int) -> str:
    """Paragraphs 0..location, each followed by `\\n`, with an image after every earlier location in
    `chosen`; then the candidates `A.<ImageHere>\\nB.<ImageHere>...`. Images: chosen ones, then candidates."""
    if not 1 <= num_candidates <= len(LETTERS):
        raise ValueError(f"num_candidates must be in 1..{len(LETTERS)}, got {num_candidates}")
    context = ""
    for i, text in enumerate(paragraphs[: location + 1]):
        context += text + "\n"
        if i in chosen and i < location:
            context += IMAGE_PLACEHOLDER
    options = "\n".join(f"{LETTERS[j]}.{IMAGE_PLACEHOLDER}" for j in range(num_candidates))
    return SELECT_HEAD + context + "候选图像包括: " + options


def edit_prompt(kind: str, text: str, material: str = "") -> str:
    """XComposer2's paragraph edits: expand (from `material`, if any), rewrite or shorten `text`."""
    return EDIT_HEADS[kind] + text + (f"\n基于以下素材：{material}" if material else "")


def insert_prompt(first: str, second: str, outline: str) -> str:
    return f"在以下两段中插入一段。\n第一段：{first}\n第二段：{second}\n插入段的大纲：{outline}"


# ---------------------------------------------------------------- parsing (pure) ---------------


def spread_locations(num_paragraphs: int, num_images: int) -> list[int]:
    """Evenly spaced paragraphs, the fallback when the model names no usable location."""
    n = min(num_images, num_paragraphs)
    return sorted({min(num_paragraphs - 1, (k + 1) * num_paragraphs // (n + 1)) for k in range(n)})


def parse_locations(answer: str, num_paragraphs: int, num_images: int) -> list[int]:
    """`<Seg i>` marks in the answer -> distinct, in-range paragraph indices, sorted, at most `num_images`."""
    found = []
    for digits in SEG_PATTERN.findall(answer):
        if not digits:
            _warn(f"ignoring a location without a number in {answer!r}")
        elif int(digits) >= num_paragraphs:
            _warn(f"ignoring location <Seg{digits}>: the article has {num_paragraphs} paragraphs")
        elif int(digits) not in found:
            found.append(int(digits))
    if len(found) > num_images:
        _warn(f"the model chose {len(found)} locations for {num_images} images; keeping the first {num_images}")
        found = found[:num_images]
    if not found and num_paragraphs and num_images:
        found = spread_locations(num_paragraphs, num_images)
        _warn(f"no usable location in {answer!r}; placing images after paragraphs {found}")
    return sorted(found)


def parse_caption(answer: str) -> str | None:
    """The continuation of `标题是"` up to the next `"`; without one, its first line (with a warning)."""
    if '"' in answer:
        caption = answer.split('"')[0].strip()
    else:
        caption = answer.strip().split("\n")[0].strip()
        _warn(f"caption without a closing quote: {answer!r}")
    if not caption:
        _warn(f"empty caption in {answer!r}")
        return None
    return caption


def parse_selection(answer: str, num_candidates: int) -> int:
    """The first letter of the answer picks a candidate; anything else picks A, with a warning."""
    stripped = answer.lstrip()
    letter = stripped[:1].upper()
    if letter and letter in LETTERS[:num_candidates]:
        return LETTERS.index(letter)
    _warn(f"no candidate letter (A..{LETTERS[num_candidates - 1]}) in {answer!r}; using A")
    return 0


# ---------------------------------------------------------------- the article ------------------


@dataclass
class Section:
    text: str
    image: str | None = None  # path of the image shown after the paragraph
    caption: str | None = None
    candidates: list[str] = field(default_factory=list)  # what retrieval offered (recorded, never opened)


# Markdown passes raw HTML through and makes links of `[text](url)`, `[text]: url` and `<url>`. In the model's
# text these characters become entities, which no renderer reads as structure: the text shows as written (as
# in the HTML output), and no tag, event attribute, `javascript:` link or remote image survives, while
# headings, emphasis and lists still render. (Inside a code span an entity shows as written.)
_MARKDOWN_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;"}


def markdown_text(text: str) -> str:
    return re.sub(r"[&<>\[\]]", lambda match: _MARKDOWN_ENTITIES[match.group()], text)


_BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def image_data_uri(path) -> str:
    """The file's own bytes when browsers read its format, else a PNG re-encoding."""
    with Image.open(path) as image:
        mime = _BROWSER_FORMATS.get(image.format)
        if mime is None:
            buffer = io.BytesIO()
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
        else:
            data = Path(path).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _copy_name(index: int, image: str) -> str:
    """`{index:02d}_{name}`; a copy made by `save` (in a `*_files` folder) drops its old index first."""
    image = Path(image)
    name = re.sub(r"^\d{2,}_", "", image.name) if image.parent.name.endswith("_files") else image.name
    return f"{index:02d}_{name}"


def _folder_mode() -> int:
    """The mode os.mkdir gives a new folder under the process's umask (which can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _keys(data, required: set, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} is a {type(data).__name__}, not an object")
    problems = [f"{what} {', '.join(sorted(keys))}" for what, keys in
                (("missing", required - set(data)), ("unknown", set(data) - required)) if keys]
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return data


def _typed(value, kinds, where: str):
    if not isinstance(value, kinds):
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
        raise ValueError(f"{where} must be {names}, not {type(value).__name__}")
    return value


def _inside(folder: Path, name: str, where: str) -> str:
    """`name` (relative to `folder`) as an absolute path, which must lie inside `folder` once links resolve."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder):
        raise ValueError(f"{where}: the image {name!r} is outside the article's folder {folder}")
    if not target.is_file():
        raise ValueError(f"{where}: the image {name!r} does not exist")
    return str(target)


@dataclass
class Article:
    instruction: str
    sections: list[Section]

    @property
    def paragraphs(self) -> list[str]:
        return [s.text for s in self.sections]

    def save(self, base) -> list[Path]:
        """BASE.md (linking copies of the images in BASE_files/), BASE.html (self-contained) and BASE.json (the
        article, naming the copies; `load` reads it). Each file and the folder appear complete or not at all."""
        base = Path(base)
        files = base.with_name(base.name + "_files")
        links = {i: f"{files.name}/{_copy_name(i, s.image)}" for i, s in enumerate(self.sections) if s.image}
        data = asdict(self)
        for i, link in links.items():
            data["sections"][i]["image"] = link
        outputs = {base.with_name(base.name + ".md"): self.markdown(links),
                   base.with_name(base.name + ".html"): self.html(),
                   base.with_name(base.name + ".json"): json.dumps(data, ensure_ascii=False, indent=1)}
        with contextlib.ExitStack() as stack:  # unwinds in reverse: the folder lands first, then the files
            temporary = {path: stack.enter_context(replacing(path)) for path in outputs}
            if links:
                folder = stack.enter_context(staged_folder(files, replace=True))
                os.chmod(folder, _folder_mode())  # staged_folder's temporary folder is private (0700)
                for i, link in links.items():
                    shutil.copyfile(self.sections[i].image, os.path.join(folder, Path(link).name))
            for path, text in outputs.items():
                temporary[path].write_text(text, encoding="utf-8")
        return list(outputs)

    @classmethod
    def load(cls, path) -> "Article":
        """An article that `save` wrote. Anything else is a ValueError naming the problem: not JSON, missing or
        unknown keys, a wrong type, or an image that is missing or outside the JSON file's folder (an absolute
        path elsewhere, `..`, a link that leads out)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the article {str(path)!r}: {err}") from err
        where = f"article {str(path)!r}"
        _keys(data, {"instruction", "sections"}, where)
        folder = path.resolve().parent
        sections = []
        for i, item in enumerate(_typed(data["sections"], (list,), f"{where}: sections")):
            at = f"{where}, section {i}"
            _keys(item, {f.name for f in fields(Section)}, at)
            image = _typed(item["image"], (str, type(None)), f"{at}: image")
            candidates = _typed(item["candidates"], (list,), f"{at}: candidates")
            for candidate in candidates:
                _typed(candidate, (str,), f"{at}: a candidate")
            sections.append(Section(_typed(item["text"], (str,), f"{at}: text"),
                                    image if image is None else _inside(folder, image, at),
                                    _typed(item["caption"], (str, type(None)), f"{at}: caption"), candidates))
        return cls(_typed(data["instruction"], (str,), f"{where}: instruction"), sections)

    def markdown(self, links: dict[int, str]) -> str:
        """The article as Markdown, with the image of section i at the relative path `links[i]`."""
        lines = []
        for i, section in enumerate(self.sections):
            lines.append(markdown_text(section.text) + "\n")
            if i in links:
                alt = markdown_text(section.caption or "").replace("\n", " ")
                lines.append(f"![{alt}]({urllib.parse.quote(links[i])})\n")
        return "\n".join(lines)

    def html(self) -> str:
        """A self-contained page: every image is embedded as a data URI, all text is escaped."""
        body = []
        for section in self.sections:
            heading = re.match(r"^(#{1,6})\s+(.*)$", section.text.strip())
            if heading:
                level = len(heading.group(1))
                body.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
            else:
                body.append(f"<p>{html.escape(section.text)}</p>")
            if section.image:
                caption = html.escape(section.caption or "")
                body.append(f'<figure><img src="{image_data_uri(section.image)}" alt="{caption}">'
                            f"<figcaption>{caption}</figcaption></figure>")
        title = html.escape(self.instruction.strip().split("\n")[0][:80])
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{max-width:46em;margin:2em auto;font-family:sans-serif;"
            "line-height:1.6;overflow-wrap:anywhere}figure{text-align:center;margin:1em 0}img{max-width:100%}"
            "figcaption{color:#555;font-size:.9em}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n"
        )


# ---------------------------------------------------------------- retrieval --------------------

CACHE_FORMAT = "xcomposer-compose CLIP pool cache 1"


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClipRetriever:
    """Text-to-image retrieval over a pool folder with a local CLIP (CLIPModel + CLIPProcessor).

    Image embeddings are cached in `cache_dir`, one safetensors file per pool (the embeddings, and in its
    metadata a JSON list of relative path, size, mtime and sha256); an entry is reused only when all four match
    and the CLIP folder is unchanged. The cache is replaced atomically, so runs that share it never read a
    partial file, and it is never unpickled: a damaged or forged one is rebuilt with a warning.
    `progress`: tqdm bars on stderr while indexing (None: only when stderr is a terminal)."""

    def __init__(self, clip_path, cache_dir=None, device: str | torch.device = "cpu", progress: bool | None = None):
        from transformers import CLIPModel, CLIPProcessor

        self.clip_path = Path(clip_path).resolve()
        if not self.clip_path.is_dir():
            raise FileNotFoundError(f"CLIP folder {str(clip_path)!r} does not exist")
        self.model = CLIPModel.from_pretrained(self.clip_path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.clip_path)
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xcomposer-compose"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default
        self.device, self.progress = device, progress
        self._pools: dict[Path, tuple[list[Path], torch.Tensor]] = {}

    def _model_key(self) -> str:
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.clip_path.iterdir() if p.is_file())
        return hashlib.sha256(repr((str(self.clip_path), stats)).encode()).hexdigest()

    @torch.no_grad()
    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def _embed_text(self, text: str) -> torch.Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True,
                                max_length=limit).to(self.device)
        features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()[0]

    def index(self, pool_dir, batch_size: int = 16) -> tuple[list[Path], torch.Tensor | None]:
        """Readable pool image paths (sorted) and their unit embeddings; only new or changed files are embedded.
        A file that cannot be read or decoded is left out with a warning that names it."""
        pool = Path(pool_dir).resolve()
        if not pool.is_dir():
            raise FileNotFoundError(f"image pool {str(pool_dir)!r} is not a folder")
        paths = sorted(p for p in pool.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        cache_file = self.cache_dir / f"clip_{hashlib.sha256(str(pool).encode()).hexdigest()[:16]}.safetensors"
        cached = self._load_cache(cache_file)
        entries, todo = {}, []  # relative path -> ((size, mtime_ns, sha256), embedding)
        for path in progress_bar(self.progress, iterable=paths, desc="checking the pool", unit="file"):
            key = path.relative_to(pool).as_posix()
            try:
                stat = path.stat()
                record = (stat.st_size, stat.st_mtime_ns, _sha256(path))
            except OSError as err:
                _warn(f"skipping a pool image: cannot read image file {str(path)!r}: {err}")
                continue
            if key in cached and cached[key][0] == record:
                entries[key] = cached[key]
            else:
                todo.append((key, path, record))
        with progress_bar(self.progress, total=len(todo), desc="embedding the pool", unit="image") as bar:
            for start in range(0, len(todo), batch_size):
                readable, images = [], []
                for key, path, record in todo[start:start + batch_size]:
                    try:
                        images.append(read_image(path))
                        readable.append((key, record))
                    except ValueError as err:
                        _warn(f"skipping a pool image: {err}")
                if images:
                    for (key, record), embedding in zip(readable, self._embed_images(images)):
                        entries[key] = (record, embedding)
                bar.update(len(todo[start:start + batch_size]))
        changed = entries.keys() != cached.keys() or any(entries[k][0] != cached[k][0] for k in entries)
        if entries and changed:
            self._save_cache(cache_file, entries)
        paths = [p for p in paths if p.relative_to(pool).as_posix() in entries]
        embeddings = torch.stack([entries[p.relative_to(pool).as_posix()][1] for p in paths]) if paths else None
        self._pools[pool] = (paths, embeddings)
        return paths, embeddings

    def _save_cache(self, cache_file: Path, entries: dict) -> None:
        keys = sorted(entries)
        metadata = {"format": CACHE_FORMAT, "model": self._model_key(),
                    "files": json.dumps([[key, *entries[key][0]] for key in keys])}
        embeddings = torch.stack([entries[key][1] for key in keys]).contiguous()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with replacing(cache_file) as tmp:
            save_file({"embeddings": embeddings}, str(tmp), metadata=metadata)

    def _load_cache(self, cache_file: Path) -> dict:
        """The entries of a cache written for this CLIP folder; empty when there is none, when it was written
        for another CLIP, and (with a warning) when it is damaged or forged."""
        if not cache_file.is_file():
            return {}
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != CACHE_FORMAT:
                    raise ValueError("it is not a cache this code wrote")
                if metadata.get("model") != self._model_key():
                    return {}
                if set(f.keys()) != {"embeddings"}:
                    raise ValueError(f"unexpected tensors {sorted(f.keys())}")
                embeddings = f.get_tensor("embeddings")
            return self._cache_entries(json.loads(metadata["files"]), embeddings)
        except Exception as err:  # any damage at all: a cache is rebuilt, never fatal
            _warn(f"rebuilding the embedding cache {str(cache_file)!r}: {type(err).__name__}: {err}")
            return {}

    def _cache_entries(self, files, embeddings: torch.Tensor) -> dict:
        shape = (len(files), self.model.config.projection_dim)
        if embeddings.dtype != torch.float32 or tuple(embeddings.shape) != shape:
            raise ValueError(f"embeddings are {embeddings.dtype} {tuple(embeddings.shape)}, expected float32 {shape}")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings that are not finite")
        entries = {}
        for item, embedding in zip(files, embeddings):
            key, size, mtime_ns, sha256 = item
            if not (isinstance(key, str) and type(size) is int and type(mtime_ns) is int and isinstance(sha256, str)):
                raise ValueError(f"a malformed file entry {item!r}")
            entries[key] = ((size, mtime_ns, sha256), embedding)
        if len(entries) != len(files):
            raise ValueError("a file listed twice")
        return entries

    def search(self, caption: str, pool_dir, k: int = 4, exclude: Sequence = ()) -> list[str]:
        """The `k` pool images most similar to `caption`, best first, skipping paths in `exclude`."""
        pool = Path(pool_dir).resolve()
        paths, embeddings = self._pools.get(pool) or self.index(pool)
        if embeddings is None:
            return []
        scores = embeddings @ self._embed_text(caption)
        excluded = {str(Path(p).resolve()) for p in exclude}
        ranked = [str(paths[i]) for i in scores.argsort(descending=True).tolist()]
        return [p for p in ranked if p not in excluded][:k]


# ---------------------------------------------------------------- model calls ------------------


@dataclass
class Exchange:
    """One model call: the full prompt text (chat format and prefill included), its images, the answer."""
    step: str
    prompt: str
    images: list
    answer: str


class Composer:
    """Runs the composition steps with an XComposer model (either generation) and its processor.

    `progress(step, done, total)` is called as the steps advance. Decoding is greedy unless
    `generation_kwargs` says otherwise. Every call is kept in `self.transcript`."""

    def __init__(self, model, processor, retriever: ClipRetriever | None = None, pool_dir=None, top_k: int = 4,
                 progress: Callable[[str, int, int], None] | None = None, generation_kwargs: dict | None = None):
        if not isinstance(processor, XComposerProcessor):
            processor = XComposerProcessor.for_model(model.config, processor)
        self.model, self.processor = model, processor
        self.retriever, self.pool_dir, self.top_k = retriever, pool_dir, top_k
        self.progress = progress or (lambda step, done, total: None)
        self.generation_kwargs = dict(generation_kwargs or {})
        self.transcript: list[Exchange] = []

    # -- one chat turn with an optional prefill ------------------------------------------------
    @torch.no_grad()
    def generate(self, step: str, content: str, prefill: str = "", images: Sequence = (),
                 max_new_tokens: int = 200, streamer=None) -> str:
        """The continuation of `prefill` in the assistant turn that answers `content` (no system prompt)."""
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill
        images = list(images)
        try:  # the messages, not the rendered prompt: the article text is encoded as plain text
            answer = self.model.reply(self.processor, messages, images, prefill=prefill, streamer=streamer,
                                      max_new_tokens=max_new_tokens, **{"do_sample": False, **self.generation_kwargs})
        except ValueError as error:  # a prompt longer than the context: this step is skipped, the article goes on
            if not str(error).startswith("prompt too long"):
                raise
            _warn(f"{step}: {error}; skipping the call")
            answer = ""
        self.transcript.append(Exchange(step, prompt, images, answer))
        return answer

    # -- the four steps ------------------------------------------------------------------------
    def write(self, instruction: str, images: Sequence = (), max_new_tokens: int = 1024, streamer=None) -> str:
        self.progress("write", 0, 1)
        article = self.generate("write", article_prompt(instruction, len(images)), images=images,
                                max_new_tokens=max_new_tokens, streamer=streamer)
        self.progress("write", 1, 1)
        return article

    def spot(self, paragraphs: Sequence[str], num_images: int, images: Sequence = ()) -> list[int]:
        self.progress("spot", 0, 1)
        answer = self.generate("spot", spotting_prompt(paragraphs, num_images, len(images)), SPOT_PREFILL, images)
        self.progress("spot", 1, 1)
        return parse_locations(answer, len(paragraphs), num_images)

    def caption(self, paragraphs: Sequence[str], locations: Sequence[int]) -> dict[int, str]:
        captions: dict[int, str] = {}
        for done, location in enumerate(locations):
            self.progress("caption", done, len(locations))
            answer = self.generate("caption", caption_prompt(paragraphs, location, list(captions.items())),
                                   CAPTION_PREFILL)
            caption = parse_caption(answer)
            if caption is None:  # retrieval still needs a query: the paragraph itself
                caption = paragraphs[location].strip()[:100]
            captions[location] = caption
        self.progress("caption", len(locations), len(locations))
        return captions

    def choose(self, paragraphs: Sequence[str], location: int, chosen: dict[int, str], candidates: Sequence[str]) -> int:
        """Index of the candidate the model picks for `location`; `chosen` maps earlier locations to images."""
        if len(candidates) == 1:
            return 0
        prompt = selection_prompt(paragraphs, location, sorted(chosen), len(candidates))
        images = [chosen[i] for i in sorted(chosen)] + list(candidates)
        answer = self.generate("select", prompt, SELECT_PREFILL, images, max_new_tokens=10)
        return parse_selection(answer, len(candidates))

    def select_from_pool(self, paragraphs, locations, captions) -> tuple[dict[int, str], dict[int, list[str]]]:
        chosen, pools = {}, {}
        for done, location in enumerate(locations):
            self.progress("select", done, len(locations))
            candidates = self.retriever.search(captions[location], self.pool_dir, self.top_k,
                                               exclude=chosen.values())
            pools[location] = candidates
            if not candidates:
                _warn(f"no pool image left for <Seg{location}>; leaving it without an image")
                continue
            chosen[location] = candidates[self.choose(paragraphs, location, chosen, candidates)]
        self.progress("select", len(locations), len(locations))
        return chosen, pools

    def select_own(self, paragraphs, locations, images: Sequence[str]) -> dict[int, str]:
        chosen: dict[int, str] = {}
        for done, location in enumerate(locations):
            self.progress("select", done, len(locations))
            left = [image for image in images if image not in chosen.values()]
            if not left:
                _warn(f"all {len(images)} images are placed; leaving <Seg{location}> without one")
                break
            chosen[location] = left[self.choose(paragraphs, location, chosen, left)]
        self.progress("select", len(locations), len(locations))
        return chosen

    def compose(self, instruction: str, num_images: int | None = None, images: Sequence = (),
                max_new_tokens: int = 1024, streamer=None) -> Article:
        """Instruction -> illustrated article. With `images` (paths), those are placed, each at most once;
        otherwise candidates come from the retriever's pool. `num_images` defaults to len(images) or 4."""
        images = [str(image) for image in images]
        num_images = num_images if num_images is not None else (len(images) or 4)
        paragraphs = split_paragraphs(self.write(instruction, images, max_new_tokens, streamer))
        sections = [Section(text) for text in paragraphs]
        article = Article(instruction, sections)
        if not paragraphs:
            _warn("the model wrote no article text; nothing to illustrate")
            return article
        if num_images <= 0 or (not images and (self.retriever is None or self.pool_dir is None)):
            if num_images > 0:
                _warn("no images given and no retriever/pool; the article stays text only")
            return article
        locations = self.spot(paragraphs, num_images, images)
        if images:
            chosen = self.select_own(paragraphs, locations, images)
        else:
            captions = self.caption(paragraphs, locations)
            chosen, pools = self.select_from_pool(paragraphs, locations, captions)
            for location, caption in captions.items():
                sections[location].caption = caption
                sections[location].candidates = pools.get(location, [])
        for location, image in chosen.items():
            sections[location].image = image
        return article

    # -- XComposer2 editing ---------------------------------------------------------------------
    def edit(self, kind: str, article: Article, index: int, material: str = "", outline: str = "",
             max_new_tokens: int = 512) -> Article:
        """One of EDITS on paragraph `index`, in place: expand (from `material`, if any), rewrite or shorten it,
        or insert a new paragraph after it from `outline` (between it and the next one, "" at the end).
        An empty answer leaves the article as it was, with a warning."""
        if kind not in EDITS:
            raise ValueError(f"unknown edit {kind!r}; the edits are {', '.join(EDITS)}")
        if material and kind != "expand":
            raise ValueError(f"material is for expand, not {kind}")
        if bool(outline) != (kind == "insert"):
            raise ValueError("insert needs an outline" if kind == "insert" else f"an outline is for insert, not {kind}")
        if not 0 <= index < len(article.sections):
            raise IndexError(f"paragraph {index} does not exist; the article has {len(article.sections)}")
        text = article.sections[index].text
        if kind == "insert":
            following = article.sections[index + 1].text if index + 1 < len(article.sections) else ""
            prompt = insert_prompt(text, following, outline)
        else:
            prompt = edit_prompt(kind, text, material)
        self.progress(kind, 0, 1)
        answer = self.generate(kind, prompt, max_new_tokens=max_new_tokens).strip()
        self.progress(kind, 1, 1)
        if not answer:
            _warn(f"{kind}: the model returned no text; the article stays as it was")
        elif kind == "insert":
            article.sections.insert(index + 1, Section(answer))
        else:
            article.sections[index].text = answer
        return article

    def expand(self, article: Article, index: int, material: str = "", max_new_tokens: int = 512) -> Article:
        return self.edit("expand", article, index, material=material, max_new_tokens=max_new_tokens)

    def rewrite(self, article: Article, index: int, max_new_tokens: int = 512) -> Article:
        return self.edit("rewrite", article, index, max_new_tokens=max_new_tokens)

    def shorten(self, article: Article, index: int, max_new_tokens: int = 512) -> Article:
        return self.edit("shorten", article, index, max_new_tokens=max_new_tokens)

    def insert(self, article: Article, index: int, outline: str, max_new_tokens: int = 512) -> Article:
        return self.edit("insert", article, index, outline=outline, max_new_tokens=max_new_tokens)
