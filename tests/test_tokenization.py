"""InternLMTokenizer: parity with upstream sentencepiece encoding and decoding, BOS/EOS, chat pieces, padding,
saving and loading through AutoTokenizer, and clear errors for missing or corrupt model files."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from tiny_sp import CHAT_PIECES, DEFAULT_VOCAB_SIZE, tiny_sp_path, train_tiny_sp  # noqa: E402
from tokenization_internlm import InternLMTokenizer  # noqa: E402

VERSIONS = [1, 2]
TEXTS = [
    "There is a red circle on the left.",
    " leading space",
    "two  spaces,\ttab and\nnew\n\nlines\n",
    "non-ASCII: 浦语·灵笔, café, 😀",
    "   ",
    "",
]
CHAT_PROMPT = {
    1: " <|User|>:How many stars?\n<TOKENS_UNUSED_0> <|Bot|>:Two.<TOKENS_UNUSED_1>",
    2: "[UNUSED_TOKEN_146]user\nHow many stars?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
}


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def tok(version):
    return InternLMTokenizer(tiny_sp_path(version))


def test_tiny_sp_is_deterministic_and_small(tmp_path, version):
    a = train_tiny_sp(tmp_path / "a", version)
    b = train_tiny_sp(tmp_path / "b", version)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert len(InternLMTokenizer(a)) == DEFAULT_VOCAB_SIZE


def test_special_token_ids_match_upstream(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert len(tok) == tok.sp_model.get_piece_size()  # nothing added on top of the sp vocabulary


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok, text):
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<s>" + text


def test_bos_prepended_once_and_no_eos(tok):
    ids = tok("a blue square").input_ids
    assert ids[0] == 1 and 1 not in ids[1:] and 2 not in ids
    assert tok("a blue square", add_special_tokens=False).input_ids == ids[1:]
    assert tok.get_special_tokens_mask(ids[1:]) == [1] + [0] * (len(ids) - 1)


def test_bos_and_eos_flags(version):
    body = InternLMTokenizer(tiny_sp_path(version))("a star", add_special_tokens=False).input_ids
    no_bos = InternLMTokenizer(tiny_sp_path(version), add_bos_token=False, add_eos_token=True)
    assert no_bos("a star").input_ids == body + [2]


def test_chat_pieces_are_single_ids_kept_by_skip_special_tokens(tok, version):
    for expected_id, piece in enumerate(CHAT_PIECES[version], start=3):
        assert tok.convert_tokens_to_ids(piece) == expected_id
        ids = tok(f"red{piece}blue\n").input_ids
        assert ids.count(expected_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == f"red{piece}blue\n"
    prompt = CHAT_PROMPT[version]
    ids = tok(prompt).input_ids
    chat_ids = range(3, 3 + len(CHAT_PIECES[version]))
    assert sum(i in chat_ids for i in ids) == sum(prompt.count(p) for p in CHAT_PIECES[version])
    assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_left_padding_uses_eos_and_masks_it(tok):
    short, long = "a star", "a yellow triangle on the right"
    batch = tok([long, short], padding=True, padding_side="left")
    short_ids = tok(short).input_ids
    n_pad = len(batch.input_ids[0]) - len(short_ids)
    assert n_pad > 0
    assert batch.input_ids[1] == [2] * n_pad + short_ids
    assert batch.attention_mask[1] == [0] * n_pad + [1] * len(short_ids)
    assert batch.attention_mask[0] == [1] * len(batch.input_ids[0])


@pytest.mark.slow
def test_save_then_autotokenizer_in_fresh_process(tmp_path):
    folders, expected = [], {}
    for version in VERSIONS:
        tok = InternLMTokenizer(tiny_sp_path(version))
        folder = tmp_path / f"v{version}"
        tok.save_pretrained(folder)
        # save_pretrained copies the module that defines the tokenizer, so the folder alone loads
        assert {"tokenizer.model", "tokenizer_config.json", "tokenization_internlm.py"} <= set(os.listdir(folder))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["auto_map"] == {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]}
        folders.append(str(folder))
        expected[str(folder)] = [tok(t).input_ids for t in TEXTS + [CHAT_PROMPT[version]]]

    # A fresh interpreter with an empty module cache proves the folder alone is enough, offline.
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "texts = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for folder, chat in zip(sys.argv[2:], texts[-2:]):\n"
        "    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "    assert type(tok).__name__ == 'InternLMTokenizer', type(tok)\n"
        "    out[folder] = [tok(t).input_ids for t in texts[:-2] + [chat]]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HOME=str(tmp_path / "hf_home"),
    )
    texts = TEXTS + [CHAT_PROMPT[v] for v in VERSIONS]
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(texts), *folders],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    InternLMTokenizer(tiny_sp_path(2)).save_pretrained(tmp_path)
    os.remove(tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="needs the sentencepiece model 'tokenizer.model'"):
        InternLMTokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a readable sentencepiece model"):
        InternLMTokenizer(str(bad))


def test_clean_up_tokenization_spaces_joins_punctuation_on_request(tok):
    ids = tok("Is it red ? yes , it is n't blue .", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Is it red ? yes , it is n't blue ."  # off by default, as upstream
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "Is it red? yes, it isn't blue."
