"""Interleaved composition: reference prompts at every step, robust parsing, CLIP retrieval with a
disk cache, editing, and an end-to-end run whose HTML renders in headless Chromium."""

import base64
import io
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch
from conftest import build_model
from PIL import Image
from tiny_sp import tiny_sp_path

import compose
from composition import (
    Article, ClipRetriever, Composer, CompositionWarning, Section, caption_prompt, earlier_captions, expand_prompt,
    insert_prompt, parse_caption, parse_locations, parse_selection, rewrite_prompt, selection_prompt,
    shorten_prompt, split_paragraphs, spotting_prompt,
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
    assert expand_prompt("t", "m") == "扩写以下段落：t\n基于以下素材：m"
    assert rewrite_prompt("t") == "改写以下段落：t"
    assert shorten_prompt("t") == "缩写以下段落：t"
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
    tokenizer = CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[])
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


class CountingRetriever(ClipRetriever):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded = []

    def _embed_images(self, paths):
        self.embedded += [p.name for p in paths]
        return super()._embed_images(paths)


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
    with pytest.warns(CompositionWarning, match="write: prompt too long: 20.. tokens"):
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
    composer, _, _ = scripted_composer(2, ["Longer one.", "", "New middle."])
    article = Article("t", [Section("one", image="x.png"), Section("two")])
    composer.expand(article, 0, "facts")
    with pytest.warns(CompositionWarning, match="no text"):
        composer.shorten(article, 1)
    composer.insert(article, 0, "a bridge")
    assert [(s.text, s.image) for s in article.sections] == [
        ("Longer one.", "x.png"), ("New middle.", None), ("two", None)]
    assert [e.prompt for e in composer.transcript] == [
        chat_turn(2, expand_prompt("one", "facts")), chat_turn(2, shorten_prompt("two")),
        chat_turn(2, insert_prompt("Longer one.", "two", "a bridge"))]
    with pytest.raises(IndexError, match="paragraph 5"):
        composer.rewrite(article, 5)


# ------------------------------------------------------------------ retrieval -----------------


def test_pool_embeddings_are_cached_on_disk_and_invalidated_by_changes(clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    blue = pool / "blue.png"
    Image.open(blue).save(blue, compress_level=0)  # stored deflate: the size depends on the pixel count only
    first = CountingRetriever(clip_dir, tmp_path / "cache")
    paths, embeddings = first.index(pool)
    assert len(first.embedded) == 5 and embeddings.shape == (5, 16)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5))

    again = CountingRetriever(clip_dir, tmp_path / "cache")  # a fresh process reads the cache
    assert torch.equal(again.index(pool)[1], embeddings) and again.embedded == []

    stat = blue.stat()
    Image.new("RGB", Image.open(blue).size, (0, 0, 90)).save(blue, compress_level=0)  # same size and mtime: only the hash changed
    assert blue.stat().st_size == stat.st_size
    os.utime(blue, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(pool / "new.png")
    os.utime(pool / "red.png")  # mtime only
    again.index(pool)
    assert sorted(again.embedded) == ["blue.png", "new.png", "red.png"]


def test_search_ranks_by_similarity_and_skips_excluded(clip_dir, tmp_path):
    pool = make_pool(tmp_path / "pool")
    retriever = ClipRetriever(clip_dir, tmp_path / "cache")
    paths, embeddings = retriever.index(pool)
    top = retriever.search("red", pool, k=5)
    scores = embeddings @ retriever._embed_text("red")
    assert top == [str(paths[i]) for i in scores.argsort(descending=True).tolist()]
    assert retriever.search("red", pool, k=4, exclude=[top[0]]) == top[1:5]


# ------------------------------------------------------------------ end to end ----------------


@pytest.fixture(scope="module")
def composed(tmp_path_factory, clip_dir):
    """The CLI on a saved tiny v2 model (real greedy decoding) and a tiny pool."""
    root = tmp_path_factory.mktemp("e2e")
    model = build_model(2, max_position_embeddings=1024)
    model.save_pretrained(root / "model")
    InternLMTokenizer(vocab_file=tiny_sp_path(2)).save_pretrained(root / "model")
    pool = make_pool(root / "pool")
    out = root / "out" / "article"
    out.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)  # random weights: fallbacks are expected
        code = compose.main([str(root / "model"), "Colours\nWrite about red and blue.", "--pool", str(pool),
                             "--clip", str(clip_dir), "--cache-dir", str(root / "cache"), "--out", str(out),
                             "--num-images", "2", "--max-new-tokens", "48", "--device", "cpu"])
    assert code == 0
    return out


def test_cli_writes_markdown_html_and_json(composed):
    article = Article.from_json(f"{composed}.json")
    placed = [s for s in article.sections if s.image]
    assert article.sections and placed
    markdown = open(f"{composed}.md", encoding="utf-8").read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == len(placed) and all((composed.parent / link).is_file() for link in links)
    page = open(f"{composed}.html", encoding="utf-8").read()
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(placed)
    for data in uris:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_cli_edits_a_saved_article(composed):
    before = Article.from_json(f"{composed}.json")
    edited = composed.with_name("edited")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)
        assert compose.main([str(composed.parent.parent / "model"), "--from", f"{composed}.json", "--edit", "insert",
                             "--paragraph", "0", "--outline", "a bridge", "--out", str(edited),
                             "--max-new-tokens", "8", "--device", "cpu"]) == 0
    after = Article.from_json(f"{edited}.json")
    assert os.path.isfile(f"{edited}.html") and os.path.isfile(f"{edited}.md")
    assert len(after.sections) in (len(before.sections), len(before.sections) + 1)
    assert after.sections[0] == before.sections[0]


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        compose.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--pool", "--clip", "--out", "--images", "--num-images", "--max-new-tokens", "--edit",
                   "--paragraph", "--material", "--outline", "--from", "--cache-dir"):
        assert option in text


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


PROBE = ("<script>window.addEventListener('load', function () {var all = Array.from(document.images);"
         "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
         "document.body.setAttribute('data-loaded', ok.length + '/' + all.length);});</script></body>")


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
