"""Interleaved text-image composition: from an instruction to an illustrated article.

The pipeline of the published demos, for both generations:
1. write the article (the instruction as a user turn, streamed);
2. split it into indexed paragraphs (`<Seg{i}> {text}\\n`, at most 60) and ask where images belong
   (prefilled `适合插入图像的行是`), then for a caption at each place (prefilled `标题是"`);
3. retrieve candidates for each caption from an image pool by CLIP text-image similarity;
4. let the model pick one candidate (prefilled `最合适的图是`), with the preceding text and images as
   context. With the user's own images, it picks among those not used yet, without retrieval.
Plus XComposer2's editing operations (expand, rewrite, shorten, insert a paragraph) and Markdown / HTML output.

Prompt building and answer parsing are pure functions; `Composer` makes the model calls. A malformed
answer never stops the article: the parser warns (`CompositionWarning`) and falls back.
"""

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from processing_xcomposer import IMAGE_PLACEHOLDER, XComposerProcessor

MAX_PARAGRAPHS = 60  # upstream's max_section
SPOT_PREFILL = "适合插入图像的行是"
CAPTION_PREFILL = '标题是"'
SELECT_PREFILL = "最合适的图是"
SELECT_HEAD = "根据给定上下文和候选图像，选择合适的配图："
SEG_PATTERN = re.compile(r"<Seg([0-9]*)>")  # upstream's `<Seg[0-9]*>`, digits captured
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class CompositionWarning(UserWarning):
    """A model answer could not be used as is; the composition went on with a fallback."""


def _warn(message: str) -> None:
    warnings.warn(message, CompositionWarning, stacklevel=3)


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


def expand_prompt(text: str, material: str = "") -> str:
    return f"扩写以下段落：{text}" + (f"\n基于以下素材：{material}" if material else "")


def rewrite_prompt(text: str) -> str:
    return f"改写以下段落：{text}"


def shorten_prompt(text: str) -> str:
    return f"缩写以下段落：{text}"


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
    candidates: list[str] = field(default_factory=list)


@dataclass
class Article:
    instruction: str
    sections: list[Section]

    @property
    def paragraphs(self) -> list[str]:
        return [s.text for s in self.sections]

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def from_json(cls, path) -> "Article":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["instruction"], [Section(**s) for s in data["sections"]])

    def to_markdown(self, path) -> Path:
        """`path` (.md) plus a `{stem}_files/` folder beside it with copies of the images."""
        path = Path(path)
        files = path.with_name(path.stem + "_files")
        lines = []
        for i, section in enumerate(self.sections):
            lines.append(section.text + "\n")
            if section.image:
                files.mkdir(parents=True, exist_ok=True)
                copy = files / f"{i:02d}_{Path(section.image).name}"
                shutil.copyfile(section.image, copy)
                link = urllib.parse.quote(f"{files.name}/{copy.name}")
                alt = (section.caption or "").replace("]", " ").replace("\n", " ")
                lines.append(f"![{alt}]({link})\n")
        path.write_text("\n".join(lines), encoding="utf-8")
        return path

    def to_html(self, path) -> Path:
        """A self-contained page: every image is embedded as a data URI."""
        path = Path(path)
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
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{max-width:46em;margin:2em auto;font-family:sans-serif;"
            "line-height:1.6;overflow-wrap:anywhere}figure{text-align:center;margin:1em 0}img{max-width:100%}"
            "figcaption{color:#555;font-size:.9em}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n"
        )
        path.write_text(page, encoding="utf-8")
        return path


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


# ---------------------------------------------------------------- retrieval --------------------


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClipRetriever:
    """Text-to-image retrieval over a pool folder with a local CLIP (CLIPModel + CLIPProcessor).

    Image embeddings are cached in `cache_dir` per pool; an entry is reused only when the file's
    relative path, size, mtime and sha256 all match and the CLIP folder is unchanged."""

    def __init__(self, clip_path, cache_dir=None, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.clip_path = Path(clip_path).resolve()
        if not self.clip_path.is_dir():
            raise FileNotFoundError(f"CLIP folder {str(clip_path)!r} does not exist")
        self.model = CLIPModel.from_pretrained(self.clip_path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.clip_path)
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xcomposer-compose"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default
        self.device = device
        self._pools: dict[Path, tuple[list[Path], torch.Tensor]] = {}

    def _model_key(self) -> str:
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.clip_path.iterdir() if p.is_file())
        return hashlib.sha256(repr((str(self.clip_path), stats)).encode()).hexdigest()

    @torch.no_grad()
    def _embed_images(self, paths: list[Path]) -> torch.Tensor:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
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

    def index(self, pool_dir, batch_size: int = 16) -> tuple[list[Path], torch.Tensor]:
        """Pool image paths (sorted) and their unit embeddings; only new or changed files are embedded."""
        pool = Path(pool_dir).resolve()
        if not pool.is_dir():
            raise FileNotFoundError(f"image pool {str(pool_dir)!r} is not a folder")
        paths = sorted(p for p in pool.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        cache_file = self.cache_dir / f"clip_{hashlib.sha256(str(pool).encode()).hexdigest()[:16]}.pt"
        cache = self._load_cache(cache_file)
        entries, todo = {}, []
        for path in paths:
            stat = path.stat()
            key = str(path.relative_to(pool))
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}
            old = cache["files"].get(key)
            if old is not None and all(old[k] == entry[k] for k in entry):
                entry["embedding"] = old["embedding"]
            else:
                todo.append((key, path))
            entries[key] = entry
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for (key, _), embedding in zip(chunk, self._embed_images([p for _, p in chunk])):
                entries[key]["embedding"] = embedding
        if todo or set(entries) != set(cache["files"]):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self._model_key(), "files": entries}, cache_file)
        embeddings = torch.stack([entries[str(p.relative_to(pool))]["embedding"] for p in paths]) if paths else None
        self._pools[pool] = (paths, embeddings)
        return paths, embeddings

    def _load_cache(self, cache_file: Path) -> dict:
        if cache_file.is_file():
            try:
                cache = torch.load(cache_file, weights_only=True)
                if cache.get("model") == self._model_key():
                    return cache
            except Exception as err:  # a corrupt cache is rebuilt, never fatal
                _warn(f"ignoring unreadable embedding cache {cache_file}: {err}")
        return {"model": None, "files": {}}

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
        try:
            answer = self.model.reply(self.processor, prompt, images, streamer=streamer, max_new_tokens=max_new_tokens,
                                      **{"do_sample": False, **self.generation_kwargs})
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
    def _edited(self, step: str, prompt: str, fallback: str, max_new_tokens: int) -> str:
        answer = self.generate(step, prompt, max_new_tokens=max_new_tokens).strip()
        if not answer:
            _warn(f"{step}: the model returned no text; keeping the paragraph as it was")
            return fallback
        return answer

    def _check(self, article: Article, index: int) -> None:
        if not 0 <= index < len(article.sections):
            raise IndexError(f"paragraph {index} does not exist; the article has {len(article.sections)}")

    def expand(self, article: Article, index: int, material: str = "", max_new_tokens: int = 512) -> Article:
        self._check(article, index)
        text = article.sections[index].text
        article.sections[index].text = self._edited("expand", expand_prompt(text, material), text, max_new_tokens)
        return article

    def rewrite(self, article: Article, index: int, max_new_tokens: int = 512) -> Article:
        self._check(article, index)
        text = article.sections[index].text
        article.sections[index].text = self._edited("rewrite", rewrite_prompt(text), text, max_new_tokens)
        return article

    def shorten(self, article: Article, index: int, max_new_tokens: int = 512) -> Article:
        self._check(article, index)
        text = article.sections[index].text
        article.sections[index].text = self._edited("shorten", shorten_prompt(text), text, max_new_tokens)
        return article

    def insert(self, article: Article, index: int, outline: str, max_new_tokens: int = 512) -> Article:
        """A new paragraph after paragraph `index` (between it and the next one, "" at the end)."""
        self._check(article, index)
        first = article.sections[index].text
        second = article.sections[index + 1].text if index + 1 < len(article.sections) else ""
        text = self._edited("insert", insert_prompt(first, second, outline), "", max_new_tokens)
        if text:
            article.sections.insert(index + 1, Section(text))
        return article
