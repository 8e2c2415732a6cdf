"""Sentencepiece tokenizer for InternLM (XComposer v1) and InternLM2 (XComposer2).

Both generations ship a plain sentencepiece `tokenizer.model`: unk 0, bos 1, eos 2, no pad piece
(pad = eos), BOS added, no EOS. The chat markers (`[UNUSED_TOKEN_146]`/`[UNUSED_TOKEN_145]` in v2,
`<TOKENS_UNUSED_0>`/`<TOKENS_UNUSED_1>` in v1) are ordinary user-defined pieces: sentencepiece itself
keeps them whole, so they need no added-token entries and `skip_special_tokens` leaves them alone.

We subclass transformers' SentencePieceBackend (5.x) for loading, vocab and saving, and change only
what breaks parity with upstream, which encoded and decoded with the sp model directly:
- decoding: the base class joins pieces and strips spaces, losing leading spaces and byte-fallback
  characters; we decode runs of ordinary pieces with the sp model instead;
- BOS/EOS: driven by `add_bos_token`/`add_eos_token`, which the 5.x base classes do not read;
- a missing or corrupt model file raises a clear error instead of a sentencepiece internal one.
"""

import os

import sentencepiece as spm
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class InternLMTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=True,
        add_eos_token=False,
        sp_model_kwargs=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        _check_sp_model(vocab_file, kwargs.get("name_or_path"))
        # The 5.x base classes ignore these flags; build_inputs_with_special_tokens below reads them.
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # legacy=True: encode with the sp model as-is (upstream did), keeping its dummy-prefix setting.
        kwargs.setdefault("legacy", True)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=eos_token if pad_token is None else pad_token,  # upstream pads with eos
            sp_model_kwargs=sp_model_kwargs or {},
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,  # cleanup would alter text
            **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            ids = token_ids_0 + (token_ids_1 or [])
            return [int(i in special) for i in ids]
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def convert_tokens_to_string(self, tokens):
        # Added/special tokens (<s>, </s>, <unk>, user-added ones) are written verbatim: sentencepiece
        # would decode control pieces to "" and unknown strings to " ⁇ ". Everything between them is
        # decoded by the sp model, which restores spaces, newlines and byte-fallback characters exactly.
        out, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                out += [self.sp_model.decode(run), token]
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


def _check_sp_model(vocab_file, name_or_path=None):
    """Fail early and clearly: the base class would pass None to sentencepiece or surface its parse error.

    ValueError, not OSError: from_pretrained replaces any OSError with a generic "Unable to load vocabulary".
    """
    where = f" in {name_or_path!r}" if name_or_path else ""
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise ValueError(
            f"InternLMTokenizer needs the sentencepiece model 'tokenizer.model'{where}; "
            f"not found (vocab_file={vocab_file!r})"
        )
    try:
        spm.SentencePieceProcessor(model_file=vocab_file)  # a few ms even for the 92k-piece model
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{vocab_file!r} is not a readable sentencepiece model: {e}") from e


# There is no fast (tokenizers) variant: AutoTokenizer maps to this class alone.
InternLMTokenizer.register_for_auto_class("AutoTokenizer")
