"""Sentencepiece tokenizer for InternLM (XComposer v1) and InternLM2 (XComposer2).

Both generations ship a plain sentencepiece `tokenizer.model`: unk 0, bos 1, eos 2, no pad piece
(pad = eos), BOS added, no EOS. Upstream encoded and decoded with the sp model directly, and so do we:
a slow tokenizer on `PreTrainedTokenizer`, the base class every transformers release from 4.45 to 5.x
has, implementing its protocol (vocabulary, `_tokenize`, id <-> piece, pieces -> text, saving).
- Text between added tokens is encoded by the sp model as is (its own dummy-prefix setting), as upstream.
- Decoding runs of ordinary pieces through the sp model restores spaces, newlines and byte-fallback
  characters exactly; added tokens are written verbatim.
- `control_tokens` (the chat format's markers, set by the processor and saved with the tokenizer) are
  ordinary sp pieces, so encoding is upstream's, but decoding with skip_special_tokens drops them, as it
  drops `<s>` and `</s>`: pipelines and users get answers without `[UNUSED_TOKEN_145]`.
- A missing or corrupt model file is a clear error instead of a sentencepiece internal one.
"""

import json
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

# What `clean_up_tokenization` joins, in transformers' order.
_SPACED_PUNCTUATION = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                       (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class InternLMTokenizer(PreTrainedTokenizer):
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
        control_tokens=None,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.sp_model = _load_sp_model(vocab_file, self.sp_model_kwargs, kwargs.get("name_or_path"))
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        for stale in ("legacy", "backend"):  # written by the 5.x SentencePieceBackend this class once used
            kwargs.pop(stale, None)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=eos_token if pad_token is None else pad_token,  # upstream pads with eos
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,  # cleanup would alter text
            control_tokens=list(control_tokens or []),
            **kwargs,
        )
        self.control_tokens = list(control_tokens or [])
        # Some releases' base __init__ resets the flags it knows; ours drive build_inputs_with_special_tokens.
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A local folder without the model file is named here: transformers 4.x turns errors raised inside
        # __init__ into a protobuf ImportError when protobuf is not installed.
        folder = os.fspath(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        if os.path.isdir(folder) and not kwargs.get("vocab_file"):
            _require_model_file(os.path.join(folder, subfolder, "tokenizer.model"), folder)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with a tokenizer_config.json every release reads: 5.x writes the special added
        tokens as a list under extra_special_tokens, which 4.5x reads as a dict and fails on (the older
        additional_special_tokens key, which 5.x still reads, is used instead), and drops add_bos_token and
        add_eos_token, which are written back."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            if isinstance(config.get("extra_special_tokens"), list):
                config["additional_special_tokens"] = config.pop("extra_special_tokens")
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")
        return result

    def set_control_tokens(self, tokens) -> None:
        """Mark pieces as control tokens (saved with the tokenizer); pieces this vocabulary lacks are left out."""
        unk = self.sp_model.unk_id()
        self.control_tokens = [t for t in tokens if t in self.added_tokens_encoder or self.sp_model.piece_to_id(t) != unk]
        self.init_kwargs["control_tokens"] = list(self.control_tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        # The same on every release: 4.x's own _decode puts spaces around added tokens that are not special.
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens))
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def clean_up_tokenization(self, text: str) -> str:
        """transformers' clean-up of spaces before punctuation and English contractions (text-generation
        pipelines ask for it). Ours: transformers 5.0 has no such method."""
        for spaced, joined in _SPACED_PUNCTUATION:
            text = text.replace(spaced, joined)
        return text

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if skip_special_tokens and not isinstance(ids, int):
            # Dropped on every release: control tokens, and added tokens marked special (4.x skips only the
            # named special tokens, 5.x all special added tokens)
            skip = {self.sp_model.piece_to_id(t) for t in self.control_tokens}
            skip |= {i for i, token in self.added_tokens_decoder.items() if token.special}
            ids = [i for i in ids if int(i) not in skip]
        return super().convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def __getstate__(self):  # the sp model does not pickle (DataLoader workers): rebuild it from its bytes
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        proto, self.sp_model = self.sp_model, spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.load_from_serialized_proto(proto)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)  # added tokens were split off before

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1}) and is not an "
                             f"added token")
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Added tokens (<s>, </s>, <unk>, markers) are written verbatim: sentencepiece would decode control pieces
        # to "" and unknown strings to " ⁇ ". Everything between them is decoded by the sp model.
        out, run = [], []
        for token in tokens:
            if token in self.added_tokens_encoder:
                out += [self.sp_model.decode(run), token]
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory, filename_prefix=None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a folder")
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if self.vocab_file and os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(target):
                shutil.copyfile(self.vocab_file, target)
        else:  # loaded from bytes (e.g. unpickled): write the model it holds
            with open(target, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (target,)


def _require_model_file(vocab_file, name_or_path=None) -> None:
    """ValueError, not OSError: from_pretrained replaces any OSError with a generic "Unable to load vocabulary"."""
    where = f" in {name_or_path!r}" if name_or_path else ""
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise ValueError(f"InternLMTokenizer needs the sentencepiece model 'tokenizer.model'{where}; "
                         f"not found (vocab_file={vocab_file!r})")


def _load_sp_model(vocab_file, sp_model_kwargs, name_or_path=None) -> spm.SentencePieceProcessor:
    """Fail early and clearly: sentencepiece would take None or surface its own parse error."""
    _require_model_file(vocab_file, name_or_path)
    model = spm.SentencePieceProcessor(**sp_model_kwargs)
    try:
        model.load(vocab_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{vocab_file!r} is not a readable sentencepiece model: {e}") from e
    return model


# There is no fast (tokenizers) variant: AutoTokenizer maps to this class alone.
InternLMTokenizer.register_for_auto_class("AutoTokenizer")
