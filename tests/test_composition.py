"""Interleaved composition: reference prompts at every step, robust parsing, CLIP retrieval with a
disk cache, editing, untrusted input (pool files, caches, saved articles, model text), progress bars,
and an end-to-end run whose HTML renders in headless Chromium."""

import base64
import contextlib
import html.parser
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
from pathlib import Path

from conftest import build_model
from PIL import Image
from tiny_sp import tiny_sp_path

import compose
import composition
from composition import (
    EDITS, Article, ClipRetriever, Composer, CompositionWarning, Section, caption_prompt, earlier_captions,
    edit_prompt, insert_prompt, parse_caption, parse_locations, parse_selection, selection_prompt, split_paragraphs,
    spotting_prompt,
)
from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer

ARTICLE = "Title\nPara one about red.\n\n  \nPara two about blue.\nPara three."
PARAGRAPHS = ["Title", "Para one about red.", "Para two about blue.", "Para three."]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 0),
           "grey": (128, 128, 128)}


def chat_turn(version, content, prefill=""):
    """The reference chat formats, written out (no system turn, as the upstream composition demos)."""
    if version == 2:
        return f"[UNUSED_TOKEN_146]user\n{content}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{prefill}"
    return f" <|User|>:{content}\n<TOKENS_UNUSED_0> <|Bot|>:{prefill}"


# ------------------------------------------------------------------ prompts -------------------


def test_article_is_split_on_newlines_without_blank_paragraphs_and_capped_at_60():
    assert split_paragraphs(ARTICLE) == PARAGRAPHS
    assert len(split_paragraphs("\n".join(f"p{i}" for i in range(80)))) == 60


def test_spotting_prompt_indexes_paragraphs_as_the_reference():
    assert spotting_prompt(PARAGRAPHS[:2], 3) == (
        '给定文章"<Seg0> Title\n<Seg1> Para one about red.\n" 根据上述文章，选择适合插入图像的3行')
    assert spotting_prompt(["a"], 1, num_user_images=2) == (
        '<ImageHere> <ImageHere>给定文章"<Seg0> a\n" 根据上述文章，选择适合插入图像的1行')


def test_caption_prompt_reads_up_to_the_next_paragraph_with_earlier_captions():
    assert caption_prompt(PARAGRAPHS, 1) == (
        '给定文章"<Seg0> Title\n<Seg1> Para one about red.\n<Seg2> Para two about blue.\n" '
        '给出适合在<Seg1>后插入的图像对应的标题。')
    assert earlier_captions([(0, "x"), (2, "y")]) == (
        '现在<Seg0>后插入图像对应的标题是"x"， <Seg2>后插入图像对应的标题是"y"。')
    assert caption_prompt(PARAGRAPHS, 3, [(1, "red")]) == (
        '给定文章"<Seg0> Title\n<Seg1> Para one about red.\n<Seg2> Para two about blue.\n<Seg3> Para three.\n" '
        '现在<Seg1>后插入图像对应的标题是"red"。给出适合在<Seg3>后插入的图像对应的标题。')


def test_selection_prompt_puts_chosen_images_in_context_and_letters_the_candidates():
    assert selection_prompt(PARAGRAPHS, 1, [], 2) == (
        "根据给定上下文和候选图像，选择合适的配图：Title\nPara one about red.\n候选图像包括: A.<ImageHere>\nB.<ImageHere>")
    assert selection_prompt(PARAGRAPHS, 3, [1], 3) == (
        "根据给定上下文和候选图像，选择合适的配图：Title\nPara one about red.\n<ImageHere>Para two about blue.\n"
        "Para three.\n候选图像包括: A.<ImageHere>\nB.<ImageHere>\nC.<ImageHere>")


def test_editing_prompts_are_xcomposer2s():
    assert edit_prompt("expand", "t", "m") == "扩写以下段落：t\n基于以下素材：m"
    assert edit_prompt("expand", "t") == "扩写以下段落：t"
    assert edit_prompt("rewrite", "t") == "改写以下段落：t"
    assert edit_prompt("shorten", "t") == "缩写以下段落：t"
    assert insert_prompt("a", "b", "o") == "在以下两段中插入一段。\n第一段：a\n第二段：b\n插入段的大纲：o"


# ------------------------------------------------------------------ parsing -------------------


def test_locations_are_parsed_with_the_seg_regex():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_locations("<Seg3>, <Seg1>.", 4, 2) == [1, 3]


@pytest.mark.parametrize("answer, expected, message", [
    ("no location at all", [1, 2], "no usable location"),
    ("<Seg1>, <Seg9>", [1], "4 paragraphs"),
    ("<Seg>, <Seg2>", [2], "without a number"),
    ("<Seg0><Seg1><Seg2>", [0, 1], "keeping the first 2"),
])
def test_malformed_locations_warn_and_fall_back(answer, expected, message):
    with pytest.warns(CompositionWarning, match=message):
        assert parse_locations(answer, 4, 2) == expected


def test_caption_ends_at_the_next_quote_and_tolerates_a_missing_one():
    assert parse_caption(' a red square" and more') == "a red square"
    with pytest.warns(CompositionWarning, match="closing quote"):
        assert parse_caption("a blue circle\nrest") == "a blue circle"
    with pytest.warns(CompositionWarning, match="empty caption"):
        assert parse_caption('"') is None


def test_selection_takes_the_first_letter_and_falls_back_to_a():
    assert parse_selection(" C. it fits", 4) == 2
    for bad in ("Z", "", "E", "图"):
        with pytest.warns(CompositionWarning, match="using A"):
            assert parse_selection(bad, 4) == 0


# ------------------------------------------------------------------ fixtures ------------------


def _bytes_to_unicode():
    """GPT-2's byte-level alphabet, so a merge-free BPE covers every UTF-8 byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    files = tmp_path_factory.mktemp("clip_tokenizer")  # vocabulary files: the one constructor every release has
    (files / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(files)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_pool(folder, names=tuple(COLOURS)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image = Image.new("RGB", (32 + 4 * i, 32), COLOURS[name])
        image.paste((255, 255, 255), (4, 4, 12, 12))
        image.save(folder / f"{name}.png")
    return folder


def write_bad_files(folder):
    """An unreadable file of each kind the pool may hold: garbage named .png, an empty .jpg, and a PNG
    declaring 20000 x 20000 pixels (a decompression bomb: PIL refuses it before decoding)."""
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (folder / "empty.jpg").write_bytes(b"")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 20001 * 8)) + chunk(b"IEND", b""))
    return ["bomb.png", "empty.jpg", "garbage.png"]


@pytest.fixture
def embedded(monkeypatch):
    """The names of the pool files that indexing decodes (the ones it embeds), in order."""
    names = []
    read = composition.read_image

    def spy(path):
        names.append(os.path.basename(path))
        return read(path)

    monkeypatch.setattr(composition, "read_image", spy)
    return names


class TTY(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


class Scripted:
    """Stands in for model.generate: records each prompt and answers from a script."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        self.calls.append((input_ids[0].tolist(), 0 if pixel_values is None else pixel_values.shape[0]))
        new = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"] + [2]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def scripted_composer(version, answers, **kwargs):
    model = build_model(version, max_position_embeddings=1024)
    tokenizer = InternLMTokenizer(vocab_file=tiny_sp_path(version))
    processor = XComposerProcessor.for_model(model.config, tokenizer)
    script = Scripted(tokenizer, answers)
    model.generate = script
    return Composer(model, processor, **kwargs), script, processor


# ------------------------------------------------------------------ the composer --------------


def test_composer_sends_the_reference_prompts_in_each_chat_format(version, clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    retriever = ClipRetriever(clip_dir, tmp_path / "cache")
    steps = []
    composer, script, processor = scripted_composer(
        version, [ARTICLE, "<Seg1>, <Seg3>.", 'a red square" ok', 'a blue square"', "B", "A"],
        retriever=retriever, pool_dir=pool, progress=lambda *step: steps.append(step))
    article = composer.compose("Write about colours", num_images=2)

    red = retriever.search("a red square", pool, 4)
    blue = retriever.search("a blue square", pool, 4, exclude=[red[1]])
    expected = [
        ("write", chat_turn(version, "Write about colours"), 0),
        ("spot", chat_turn(version, spotting_prompt(PARAGRAPHS, 2), "适合插入图像的行是"), 0),
        ("caption", chat_turn(version, caption_prompt(PARAGRAPHS, 1), '标题是"'), 0),
        ("caption", chat_turn(version, caption_prompt(PARAGRAPHS, 3, [(1, "a red square")]), '标题是"'), 0),
        ("select", chat_turn(version, selection_prompt(PARAGRAPHS, 1, [], 4), "最合适的图是"), 4),
        ("select", chat_turn(version, selection_prompt(PARAGRAPHS, 3, [1], 4), "最合适的图是"), 5),
    ]
    assert [(e.step, e.prompt, len(e.images)) for e in composer.transcript] == expected
    for (ids, num_pixels), exchange in zip(script.calls, composer.transcript):
        assert ids == processor(text=exchange.prompt, images=exchange.images or None)["input_ids"][0].tolist()
        assert num_pixels == len(exchange.images)
    assert composer.transcript[5].images == [red[1], *blue]
    assert [(s.text, s.image, s.caption) for s in article.sections] == [
        ("Title", None, None), (PARAGRAPHS[1], red[1], "a red square"),
        (PARAGRAPHS[2], None, None), (PARAGRAPHS[3], blue[0], "a blue square")]
    assert ("write", 1, 1) in steps and ("select", 2, 2) in steps


def test_own_images_are_placed_without_retrieval_and_never_reused(tmp_path):
    pool = make_pool(tmp_path / "mine", ["red", "green", "blue"])
    images = [str(pool / f"{name}.png") for name in ("red", "green", "blue")]
    composer, script, _ = scripted_composer(2, [ARTICLE, "<Seg0> <Seg1> <Seg3>", "B", "B"])
    article = composer.compose("Write", images=images)
    assert composer.transcript[0].prompt == chat_turn(2, "<ImageHere> <ImageHere> <ImageHere>Write")
    assert composer.transcript[1].prompt == chat_turn(
        2, spotting_prompt(PARAGRAPHS, 3, num_user_images=3), "适合插入图像的行是")
    assert [e.step for e in composer.transcript] == ["write", "spot", "select", "select"]
    assert composer.transcript[3].images == [images[1], images[0], images[2]]  # chosen green, then red, blue left
    assert [s.image for s in article.sections] == [images[1], images[2], None, images[0]]


def test_malformed_answers_still_give_an_article_with_warnings(version, clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    composer, _, _ = scripted_composer(
        version, [ARTICLE, "nowhere", "unterminated caption", 'x"', "Z?", "q"],
        retriever=ClipRetriever(clip_dir, tmp_path / "cache"), pool_dir=pool)
    with pytest.warns(CompositionWarning) as record:
        article = composer.compose("Write", num_images=2)
    messages = " | ".join(str(w.message) for w in record)
    assert "no usable location" in messages and "closing quote" in messages and "using A" in messages
    assert article.paragraphs == PARAGRAPHS
    assert sum(s.image is not None for s in article.sections) == 2


def test_an_empty_article_or_a_too_long_prompt_warns_instead_of_crashing():
    composer, _, _ = scripted_composer(2, [""])
    with pytest.warns(CompositionWarning, match="no article text"):
        assert composer.compose("Write", num_images=2).sections == []
    model = build_model(2)  # 256 positions
    composer = Composer(model, InternLMTokenizer(vocab_file=tiny_sp_path(2)))
    with pytest.warns(CompositionWarning, match="write: prompt too long: sample 0 is 20.. tokens"):
        assert composer.generate("write", "word " * 400) == ""


def test_v1_never_generates_embedding_rows_the_tokenizer_cannot_decode():
    model = build_model(1)  # 386 embedding rows, 384 sentencepiece pieces
    tokenizer = InternLMTokenizer(vocab_file=tiny_sp_path(1))
    assert model.config.text_config.vocab_size > len(tokenizer)

    def favour_padding_rows(module, args, logits):
        logits = logits.clone()
        logits[..., len(tokenizer):] += 1e4
        return logits

    model.output.register_forward_hook(favour_padding_rows)
    answer = Composer(model, tokenizer).generate("write", "Hi", max_new_tokens=4)
    assert isinstance(answer, str) and answer


def test_edits_replace_or_insert_paragraphs_and_keep_text_on_empty_answers():
    composer, _, _ = scripted_composer(2, ["Longer one.", "", "New middle.", "Other words.", ""])
    article = Article("t", [Section("one", image="x.png"), Section("two")])
    composer.expand(article, 0, "facts")
    with pytest.warns(CompositionWarning, match="shorten: the model returned no text"):
        composer.shorten(article, 1)
    composer.insert(article, 0, "a bridge")
    composer.edit("rewrite", article, 2)
    with pytest.warns(CompositionWarning, match="insert: the model returned no text"):
        composer.edit("insert", article, 2, outline="an ending")
    assert [(s.text, s.image) for s in article.sections] == [
        ("Longer one.", "x.png"), ("New middle.", None), ("Other words.", None)]
    assert [e.prompt for e in composer.transcript] == [
        chat_turn(2, edit_prompt("expand", "one", "facts")), chat_turn(2, edit_prompt("shorten", "two")),
        chat_turn(2, insert_prompt("Longer one.", "two", "a bridge")), chat_turn(2, edit_prompt("rewrite", "two")),
        chat_turn(2, insert_prompt("Other words.", "", "an ending"))]
    assert [e.step for e in composer.transcript] == ["expand", "shorten", "insert", "rewrite", "insert"]


@pytest.mark.parametrize("call, error, message", [
    (lambda c, a: c.rewrite(a, 5), IndexError, "paragraph 5 does not exist; the article has 2"),
    (lambda c, a: c.edit("summarise", a, 0), ValueError, "unknown edit 'summarise'; the edits are expand, rewrite, "
                                                         "shorten, insert"),
    (lambda c, a: c.edit("rewrite", a, 0, material="m"), ValueError, "material is for expand, not rewrite"),
    (lambda c, a: c.edit("insert", a, 0), ValueError, "insert needs an outline"),
    (lambda c, a: c.edit("shorten", a, 0, outline="o"), ValueError, "an outline is for insert, not shorten"),
])
def test_a_bad_edit_is_refused_before_any_model_call(call, error, message):
    composer, _, _ = scripted_composer(2, [])
    article = Article("t", [Section("one"), Section("two")])
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(composer, article)
    assert composer.transcript == [] and article.paragraphs == ["one", "two"]
    assert EDITS == ("expand", "rewrite", "shorten", "insert")



# ------------------------------------------------------------------ retrieval -----------------


def test_pool_embeddings_are_cached_on_disk_and_invalidated_by_changes(clip_dir, tmp_path, embedded):
    pool = make_pool(tmp_path / "pool")
    blue = pool / "blue.png"
    Image.open(blue).save(blue, compress_level=0)  # stored deflate: the size depends on the pixel count only
    first = ClipRetriever(clip_dir, tmp_path / "cache")
    paths, embeddings = first.index(pool)
    assert len(embedded) == 5 and embeddings.shape == (5, 16)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5))
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]  # no temporary file left

    embedded.clear()
    again = ClipRetriever(clip_dir, tmp_path / "cache")  # a fresh process reads the cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(again.index(pool)[1], embeddings) and embedded == []

    stat = blue.stat()
    Image.new("RGB", Image.open(blue).size, (0, 0, 90)).save(blue, compress_level=0)  # same size and mtime: only the hash changed
    assert blue.stat().st_size == stat.st_size
    os.utime(blue, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(pool / "new.png")
    os.utime(pool / "red.png")  # mtime only
    again.index(pool)
    assert sorted(embedded) == ["blue.png", "new.png", "red.png"]


def test_unreadable_pool_files_are_skipped_with_a_warning_naming_each(clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    bad = write_bad_files(pool)
    retriever = ClipRetriever(clip_dir, tmp_path / "cache")
    with pytest.warns(CompositionWarning) as record:
        paths, embeddings = retriever.index(pool)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3
    for name, message, reason in zip(bad, messages, ["exceeds limit", "cannot identify", "cannot identify"]):
        assert message.startswith(f"skipping a pool image: cannot read image file {str(pool / name)!r}: ")
        assert reason in message
    assert [p.name for p in paths] == sorted(f"{name}.png" for name in COLOURS) and embeddings.shape == (5, 16)
    assert sorted(retriever.search("red", pool, k=10)) == sorted(map(str, paths))
    with pytest.warns(CompositionWarning, match="skipping a pool image") as record:  # still bad: said again
        assert ClipRetriever(clip_dir, tmp_path / "cache").index(pool)[0] == paths
    assert len(record) == 3


def _cache_file(tmp_path):
    (cache,) = (tmp_path / "cache").iterdir()
    return cache


class Payload:
    """Unpickling this runs code: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _forge_rows(cache):
    """A well-formed safetensors file with this code's metadata and one row too many."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(cache), framework="pt") as f:
        metadata, embeddings = f.metadata(), f.get_tensor("embeddings")
    save_file({"embeddings": torch.cat([embeddings, embeddings[:1]])}, str(cache), metadata=metadata)


@pytest.mark.parametrize("damage, message", [
    (lambda cache, marker: cache.write_bytes(b"\x00garbage" * 100), "SafetensorError"),
    (lambda cache, marker: cache.write_bytes(pickle.dumps({"files": Payload(marker)})), "SafetensorError"),
    (lambda cache, marker: cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2]), "SafetensorError"),
    (lambda cache, marker: _forge_rows(cache), "embeddings are torch.float32 (6, 16), expected float32 (5, 16)"),
], ids=["garbage", "pickle", "truncated", "forged"])
def test_a_damaged_or_forged_cache_is_never_unpickled_and_is_rebuilt(clip_dir, tmp_path, embedded, damage, message):
    pool = make_pool(tmp_path / "pool")
    paths, embeddings = ClipRetriever(clip_dir, tmp_path / "cache").index(pool)
    cache, marker = _cache_file(tmp_path), tmp_path / "unpickled"
    damage(cache, marker)
    embedded.clear()
    with pytest.warns(CompositionWarning) as record:
        again = ClipRetriever(clip_dir, tmp_path / "cache").index(pool)
    assert len(record) == 1
    warning = str(record[0].message)
    assert warning.startswith(f"rebuilding the embedding cache {str(cache)!r}: ") and message in warning
    assert not marker.exists()
    assert len(embedded) == 5 and again[0] == paths and torch.allclose(again[1], embeddings)
    embedded.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache reads cleanly
        ClipRetriever(clip_dir, tmp_path / "cache").index(pool)
    assert embedded == []


def test_the_cache_is_replaced_atomically_and_a_failed_write_keeps_the_old_one(clip_dir, tmp_path, monkeypatch):
    pool = make_pool(tmp_path / "pool", ["red", "green"])
    retriever = ClipRetriever(clip_dir, tmp_path / "cache")
    retriever.index(pool)
    cache = _cache_file(tmp_path)
    before = cache.read_bytes()
    written = []

    def interrupted(tensors, filename, metadata=None):  # dies half-way through writing
        written.append(filename)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(composition, "save_file", interrupted)
    make_pool(pool, ["blue"])
    with pytest.raises(OSError, match="disk full"):
        retriever.index(pool)
    assert os.path.dirname(written[0]) == str(cache.parent) and written[0] != str(cache)
    assert list(cache.parent.iterdir()) == [cache] and cache.read_bytes() == before
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ClipRetriever(clip_dir, tmp_path / "cache").index(pool)[0]) == 3


def test_indexing_shows_bars_on_a_terminal_or_when_forced_and_none_when_quiet(clip_dir, tmp_path, monkeypatch, capsys):
    pool = make_pool(tmp_path / "pool")
    forced, auto, quiet, tty = (ClipRetriever(clip_dir, tmp_path / name, progress=show)
                                for name, show in [("forced", True), ("auto", None), ("quiet", False), ("tty", None)])
    capsys.readouterr()  # transformers' own loading bars
    forced.index(pool)
    err = capsys.readouterr().err
    assert "checking the pool: 100%" in err and "embedding the pool: 100%" in err and "5/5" in err
    auto.index(pool)  # pytest's stderr is no terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stderr", TTY())
    quiet.index(pool)
    assert sys.stderr.getvalue() == ""
    tty.index(pool)
    assert "embedding the pool: 100%" in sys.stderr.getvalue()


def test_search_ranks_by_similarity_and_skips_excluded(clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    retriever = ClipRetriever(clip_dir, tmp_path / "cache")
    paths, embeddings = retriever.index(pool)
    top = retriever.search("red", pool, k=5)
    scores = embeddings @ retriever._embed_text("red")
    assert top == [str(paths[i]) for i in scores.argsort(descending=True).tolist()]
    assert retriever.search("red", pool, k=4, exclude=[top[0]]) == top[1:5]


# ------------------------------------------------------------------ the saved article ---------


def saved(tmp_path):
    """An article with an image from a pool, saved as out/a.*: the JSON path and the pool image."""
    red = make_pool(tmp_path / "pool", ["red"]) / "red.png"
    (tmp_path / "out").mkdir()
    article = Article("Colours", [Section("# Red", image=str(red), caption="a red square", candidates=[str(red)]),
                                  Section("Plain text.")])
    written = article.save(tmp_path / "out" / "a")
    assert [p.name for p in written] == ["a.md", "a.html", "a.json"]
    return tmp_path / "out" / "a.json", red


def test_a_saved_article_names_copies_inside_its_folder_and_loads_back(tmp_path):
    path, red = saved(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["sections"][0] == {"text": "# Red", "image": "a_files/00_red.png", "caption": "a red square",
                                   "candidates": [str(red)]}
    article = Article.load(path)
    copy = tmp_path / "out" / "a_files" / "00_red.png"
    assert article.sections[0] == Section("# Red", str(copy.resolve()), "a red square", [str(red)])
    assert copy.read_bytes() == red.read_bytes()
    assert "![a red square](a_files/00_red.png)" in (tmp_path / "out" / "a.md").read_text(encoding="utf-8")
    article.save(tmp_path / "out" / "a")  # in place: the copies keep their names, nothing is left over
    assert Article.load(path) == article
    assert sorted(os.listdir(tmp_path / "out")) == ["a.html", "a.json", "a.md", "a_files"]
    assert os.listdir(tmp_path / "out" / "a_files") == ["00_red.png"]
    os.mkdir(tmp_path / "probe")
    assert os.stat(tmp_path / "out" / "a_files").st_mode & 0o777 == os.stat(tmp_path / "probe").st_mode & 0o777


@pytest.mark.parametrize("image, problem", [
    ("/etc/passwd", "is outside the article's folder"),
    ("../x.png", "is outside the article's folder"),
    ("link.png", "is outside the article's folder"),
    ("a_files/none.png", "does not exist"),
])
def test_an_article_naming_an_image_outside_its_folder_is_refused_before_anything_is_copied(
        tmp_path, image, problem, monkeypatch, capsys):
    path, red = saved(tmp_path)
    shutil.copyfile(red, tmp_path / "x.png")
    os.symlink(tmp_path / "x.png", tmp_path / "out" / "link.png")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["sections"][0]["image"] = image
    path.write_text(json.dumps(data), encoding="utf-8")
    message = f"article {str(path)!r}, section 0: the image {image!r} " + (
        f"{problem} {path.parent}" if "outside" in problem else problem)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Article.load(path)
    monkeypatch.setattr(compose, "load", no_model)
    before = sorted(os.listdir(tmp_path / "out"))
    assert compose.main([str(tmp_path), "--from", str(path), "--edit", "rewrite", "--paragraph", "0",
                         "--out", str(tmp_path / "out" / "b")]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(os.listdir(tmp_path / "out")) == before


@pytest.mark.parametrize("change, message", [
    (lambda d: d["sections"][0].pop("caption"), ", section 0: missing caption"),
    (lambda d: d.update(script="alert(1)"), ": unknown script"),
    (lambda d: (d.pop("instruction"), d.update(extra=1)), ": missing instruction; unknown extra"),
    (lambda d: d["sections"][1].update(text=5), ", section 1: text must be str, not int"),
    (lambda d: d["sections"][0].update(candidates="x"), ", section 0: candidates must be list, not str"),
    (lambda d: d.update(sections={}), ": sections must be list, not dict"),
    (lambda d: d["sections"].append([]), ", section 2 is a list, not an object"),
])
def test_missing_extra_or_mistyped_keys_are_a_clear_error(tmp_path, change, message):
    path, _ = saved(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(f'article {str(path)!r}' + message)}$"):
        Article.load(path)


def test_an_article_that_is_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\x80 not json")
    with pytest.raises(ValueError, match=f"^cannot read the article {re.escape(repr(str(path)))}: .*utf-8"):
        Article.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"^article {re.escape(repr(str(path)))} is a list, not an object$"):
        Article.load(path)


HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    "<javascript:alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    "[x](&#106;avascript:alert(1))",
    "[ref]",
    "[ref]: javascript:alert(1)",
    "![pixel](http://tracker.invalid/p.png)",
]


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data


def test_markdown_and_html_show_hostile_text_as_text(tmp_path):
    red = make_pool(tmp_path / "pool", ["red"]) / "red.png"
    caption = '<img src=x onerror=alert(2)> [a](javascript:alert(3))'
    article = Article("t", [Section(text) for text in HOSTILE] + [Section("# Heading *kept*", str(red), caption)])
    md, page, _ = article.save(tmp_path / "a")
    markdown = md.read_text(encoding="utf-8")
    assert markdown.splitlines()[:3] == [
        "&lt;script&gt;alert(1)&lt;/script&gt;", "", '&lt;img src=x onerror="alert(1)"&gt;']
    assert "&#91;click&#93;(javascript:alert(1))" in markdown and "# Heading *kept*" in markdown
    markdown_it = pytest.importorskip("markdown_it")
    for rendered in (markdown_it.MarkdownIt("commonmark").render(markdown), page.read_text(encoding="utf-8")):
        parsed = Tags()
        parsed.feed(rendered)
        tags = {tag for tag, _ in parsed.tags}
        assert not tags & {"script", "a", "iframe", "object", "embed", "svg"}, tags
        assert all(not name.startswith("on") for _, attrs in parsed.tags for name in attrs)
        images = [attrs for tag, attrs in parsed.tags if tag == "img"]
        assert len(images) == 1 and images[0]["src"].startswith(("a_files/", "data:image/png;base64,"))
        assert images[0]["alt"] == caption
        for text in HOSTILE:  # shown as written
            assert text in parsed.text or text.replace("&#106;", "&") in parsed.text
    assert "<h1>Heading <em>kept</em></h1>" in markdown_it.MarkdownIt("commonmark").render(markdown)


# ------------------------------------------------------------------ bad input on the command line


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_cli_reports_unreadable_images_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compose, "load", no_model)
    good = make_pool(tmp_path / "mine", ["red"]) / "red.png"
    bad, missing = tmp_path / "bad.png", tmp_path / "missing.png"
    bad.write_bytes(b"not an image")
    assert compose.main([str(tmp_path), "Write", "--images", str(good), str(bad), str(missing),
                         "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot read image file {str(bad)!r}: cannot identify image file {str(bad)!r}",
        f"error: cannot read image file {str(missing)!r}: [Errno 2] No such file or directory: {str(missing)!r}"]
    assert sorted(os.listdir(tmp_path)) == ["bad.png", "mine"]


def test_cli_reports_an_out_in_a_missing_folder_or_a_folder_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compose, "load", no_model)
    out = tmp_path / "missing" / "a"
    assert compose.main([str(tmp_path), "Write", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out {str(out)!r}: the folder {out.parent} does not exist\n"
    assert compose.main([str(tmp_path), "Write", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: --out {str(tmp_path)!r} is a folder; give a base name such as {str(tmp_path / 'article')!r}\n")
    assert compose.main([str(tmp_path), "Write", "--pool", str(tmp_path / "nowhere"), "--clip", str(tmp_path),
                         "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err == f"error: --pool {str(tmp_path / 'nowhere')!r} is not a folder\n"
    assert os.listdir(tmp_path) == []


def test_cli_refuses_a_paragraph_the_saved_article_lacks_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compose, "load", no_model)
    path, _ = saved(tmp_path)
    assert compose.main([str(tmp_path), "--from", str(path), "--edit", "shorten", "--paragraph", "2",
                         "--out", str(tmp_path / "out" / "b")]) == 1
    assert capsys.readouterr().err == "error: --paragraph 2: the article has 2 paragraphs\n"


# ------------------------------------------------------------------ end to end ----------------


@pytest.fixture(scope="module")
def composed_run(tmp_path_factory, clip_dir):
    """The CLI on a saved tiny v2 model (real greedy decoding) and a tiny pool holding three unreadable files,
    with a stderr that is a terminal: the output base, stderr, and the composition warnings."""
    root = tmp_path_factory.mktemp("e2e")
    model = build_model(2, max_position_embeddings=1024)
    model.save_pretrained(root / "model")
    InternLMTokenizer(vocab_file=tiny_sp_path(2)).save_pretrained(root / "model")
    pool = make_pool(root / "pool")
    write_bad_files(pool)
    out = root / "out" / "article"
    out.parent.mkdir()
    stderr = TTY()
    with warnings.catch_warnings(record=True) as record, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always", CompositionWarning)  # random weights: fallbacks are expected
        code = compose.main([str(root / "model"), "Colours\nWrite about red and blue.", "--pool", str(pool),
                             "--clip", str(clip_dir), "--cache-dir", str(root / "cache"), "--out", str(out),
                             "--num-images", "2", "--max-new-tokens", "48", "--device", "cpu"])
    assert code == 0
    return out, stderr.getvalue(), [str(w.message) for w in record if issubclass(w.category, CompositionWarning)]


@pytest.fixture(scope="module")
def composed(composed_run):
    return composed_run[0]


def test_cli_skips_unreadable_pool_files_naming_each(composed_run):
    out, _, messages = composed_run
    skipped = [m for m in messages if m.startswith("skipping a pool image: ")]
    assert sorted(re.search(r"cannot read image file '([^']+)'", m).group(1) for m in skipped) == [
        str(out.parent.parent / "pool" / name) for name in ("bomb.png", "empty.jpg", "garbage.png")]
    article = Article.load(f"{out}.json")
    assert all(s.image is None or s.image.endswith(tuple(f"{c}.png" for c in COLOURS)) for s in article.sections)


def test_cli_shows_bars_for_indexing_and_each_step_on_a_terminal(composed_run):
    _, err, _ = composed_run
    for bar in ("checking the pool: 100%", "embedding the pool: 100%", "spot: 100%", "caption: 100%",
                "select: 100%"):
        assert bar in err
    assert "write:" not in err  # the article itself streams to stdout
    assert re.search(r"^wrote .*article\.md, .*article\.html, .*article\.json: \d+ paragraphs, \d+ images$", err, re.M)


def test_cli_quiet_shows_no_bar_on_a_terminal(composed, clip_dir, tmp_path, monkeypatch):
    root = composed.parent.parent
    monkeypatch.setattr(sys, "stderr", TTY())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)
        assert compose.main([str(root / "model"), "Write about red.", "--pool", str(root / "pool"), "--clip",
                             str(clip_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "q"),
                             "--num-images", "1", "--max-new-tokens", "4", "--device", "cpu", "--quiet"]) == 0
    assert sys.stderr.getvalue() == ""
    assert (tmp_path / "q.json").is_file()


def test_cli_writes_markdown_html_and_json(composed):
    article = Article.load(f"{composed}.json")
    placed = [s for s in article.sections if s.image]
    assert article.sections and placed
    assert all(Path(s.image).parent == composed.with_name("article_files") for s in placed)  # the copies
    markdown = open(f"{composed}.md", encoding="utf-8").read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == len(placed) and all((composed.parent / link).is_file() for link in links)
    page = open(f"{composed}.html", encoding="utf-8").read()
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(placed)
    for data in uris:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_cli_edits_a_saved_article(composed):
    before = Article.load(f"{composed}.json")
    edited = composed.with_name("edited")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)
        assert compose.main([str(composed.parent.parent / "model"), "--from", f"{composed}.json", "--edit", "insert",
                             "--paragraph", "0", "--outline", "a bridge", "--out", str(edited),
                             "--max-new-tokens", "8", "--device", "cpu"]) == 0
    after = Article.load(f"{edited}.json")
    assert os.path.isfile(f"{edited}.html") and os.path.isfile(f"{edited}.md")
    assert len(after.sections) in (len(before.sections), len(before.sections) + 1)
    assert after.sections[0].text == before.sections[0].text
    for old, new in zip(before.sections, after.sections[:1] + after.sections[len(after.sections) - len(before.sections) + 1:]):
        assert (old.image is None) == (new.image is None)  # images copied into edited_files/
        assert new.image is None or (Path(new.image).parent.name == "edited_files"
                                     and Path(new.image).read_bytes() == Path(old.image).read_bytes())


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        compose.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--pool", "--clip", "--out", "--images", "--num-images", "--max-new-tokens", "--edit",
                   "--paragraph", "--material", "--outline", "--from", "--cache-dir", "--quiet"):
        assert option in text


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


PROBE = ("<script>window.addEventListener('load', function () {var all = Array.from(document.images);"
         "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
         "document.body.setAttribute('data-loaded', ok.length + '/' + all.length);});</script></body>")


@pytest.mark.slow  # Chromium
def test_html_renders_in_headless_chromium_with_every_image_loaded(composed, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    page = open(f"{composed}.html", encoding="utf-8").read()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE), encoding="utf-8")
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    assert loaded.group(1) == loaded.group(2) == str(page.count("<img "))

    shot = tmp_path / "article.png"
    subprocess.run(flags + ["--window-size=800,1200", f"--screenshot={shot}", f"file://{composed}.html"],
                   capture_output=True, timeout=60)
    with Image.open(shot) as image:
        low, high = zip(*image.convert("RGB").getextrema())
        assert max(high) - min(low) > 100  # not blank
    artifacts = os.path.join(os.path.dirname(__file__), "artifacts")
    if os.path.isdir(artifacts):
        shutil.copyfile(shot, os.path.join(artifacts, "composition_article.png"))
