"""Train a tiny, deterministic sentencepiece model standing in for InternLM's tokenizer.model.

Layout matches upstream: unk 0, bos 1, eos 2, no pad piece (pad = eos), byte fallback so any
text round-trips, and the chat markers as single user-defined pieces.
"""

import functools
import io
import itertools
import os
import tempfile

import sentencepiece as spm

CHAT_PIECES = {
    2: ["[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"],
    1: ["<TOKENS_UNUSED_0>", "<TOKENS_UNUSED_1>", "<|User|>", "<|Bot|>"],
}
DEFAULT_VOCAB_SIZE = 384  # 3 specials + 256 byte pieces + chat pieces + ~120 merges/chars


def _corpus():
    # A fixed product of small word lists: no randomness, so training input is identical every call.
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    shapes = ["circle", "square", "triangle", "star"]
    places = ["left", "right", "top", "bottom", "middle"]
    for i, (c, s, p) in enumerate(itertools.product(colours, shapes, places)):
        yield f"There is a {c} {s} on the {p} of the image."
        yield f"How many {s}s are in the picture? I count {i % 7 + 1}."
        yield f"user: describe the image. assistant: a {c} {s} is {p}."
    yield "The quick brown fox jumps over the lazy dog. 0123456789 (yes, no)!"
    yield "system\nYou are a helpful assistant.\nuser\nWhat do you see?\nassistant\nI see shapes."


def train_tiny_sp(out_dir, version=2, vocab_size=DEFAULT_VOCAB_SIZE) -> str:
    if version not in CHAT_PIECES:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    spm.set_random_generator_seed(0)  # BPE does not sample, but pin the seed anyway
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(),
        model_writer=model,
        model_type="bpe",  # BPE training has no sampling, so the output is byte-identical
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        # Keep text verbatim (no NFKC, no whitespace squeezing) so encode/decode round-trips
        # spaces and newlines. InternLM2 adds no dummy "▁" prefix; v1 is LLaMA-style and does.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=(version == 1),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=CHAT_PIECES[version],
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def tiny_sp_path(version=2) -> str:
    """Train once per process and version; the temp dir lives as long as the process."""
    return _cached_sp_path(int(version))


@functools.lru_cache(maxsize=None)
def _cached_sp_path(version):
    return train_tiny_sp(tempfile.mkdtemp(prefix=f"tiny_sp_v{version}_"), version)
