"""Configuration of InternLM-XComposer (v1, 2023) and InternLM-XComposer2 (v2, 2024).

One config serves both generations. `connector` selects the path between image and decoder:
- "mlp2x_gelu": v2. CLIP ViT-L/14 patch features -> MLP projector -> InternLM2 with Partial LoRA.
- "perceive_sampler": v1. EVA-CLIP ViT-g -> BLIP-2 Q-Former with learned queries -> projection,
  wrapped in learned start/end flags -> InternLM (LoRA merged, or as plain adapters).

XComposer-2.5 and XComposer2-4KHD are "mlp2x_gelu" models that see an image as a global view plus a grid of
tiles (`hd_num` set): the tile is `vision_config.image_size`, 2x2 patch tokens merge into one (`HD_MERGE`), learned
separators mark rows and the global/tile boundary, and the number of image positions depends on the image's size
(`hd_image_tokens`).

The classes use a classic `__init__` (attributes set after the base class's own), which every
transformers release from 4.45 to 5.x accepts for remote code; sub-configs are built here from dicts.
"""

from transformers import PretrainedConfig

try:  # as remote code, inside transformers' dynamic package
    from .transformers_compat import config_eq
except ImportError:  # from a checkout, where scripts and tests import the flat modules directly
    try:  # a try of its own: transformers 4.x's scan for missing packages skips only try blocks
        from transformers_compat import config_eq
    except ImportError:
        raise

# The Auto classes a folder of ours loads with (trust_remote_code), and the flat modules that define them. Each
# class registers itself under its entry (register_for_auto_class), so its save_pretrained copies its module;
# the config starts from the whole table, so aliases such as AutoModelForImageTextToText are always present.
AUTO_MAP = {
    "AutoConfig": "configuration_xcomposer.XComposerConfig",
    "AutoModel": "modeling_xcomposer.XComposerModel",
    "AutoModelForCausalLM": "modeling_xcomposer.XComposerForCausalLM",
    "AutoModelForImageTextToText": "modeling_xcomposer.XComposerForCausalLM",
    "AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None],
    "AutoProcessor": "processing_xcomposer.XComposerProcessor",
}
CONNECTORS = ("mlp2x_gelu", "perceive_sampler")
# XComposer-2.5 / 4KHD: each HD_MERGE x HD_MERGE block of patch tokens becomes one token (fixed in upstream code).
HD_MERGE = 2
HD_PADDINGS = ("bottom", "center")  # where a tile grid's white padding goes (upstream copies differ)
# The decoder linears that carry (Partial) LoRA, attention then feed-forward, as InternLM2 names them.
LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")


def _set_arguments(config, arguments: dict) -> None:
    """A config's own __init__ arguments as its attributes, set after the base class's __init__ (which on 4.x
    resets the special token ids it knows)."""
    for name, value in arguments.items():
        if name not in ("self", "kwargs", "__class__"):
            setattr(config, name, value)


def _positive_ints(where: str, config, names) -> None:
    """Sizes from a config file are untrusted: reject non-integers and non-positive values by name."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")


def _positive_floats(where: str, config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}.{name} must be a positive number, got {value!r}")


def hd_image_tokens(rows: int, cols: int, merged_grid: int) -> int:
    """Image positions of one HD image whose tile grid is rows x cols, each view merged to merged_grid x
    merged_grid tokens: the global view with a row separator after each of its rows, one global/tile separator,
    then the stitched tile grid with a separator after each of its rows."""
    return (rows * cols + 1) * merged_grid**2 + 1 + (rows + 1) * merged_grid


def _check_heads(where: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"{where}: num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size})")


class XComposerVisionConfig(PretrainedConfig):
    """A pre-LN ViT. `variant` "clip" is OpenAI CLIP (pre_layrnorm, q/k/v biases, quick_gelu);
    "eva" is EVA-CLIP as built by BLIP-2 (conv bias, q_bias/v_bias only, exact GELU, ln_vision at the end)."""

    model_type = "xcomposer_vision"
    __eq__ = config_eq
    base_config_key = "vision_config"

    def __init__(self, variant="clip", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=490, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 final_layer_norm_eps=1e-5, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        _set_arguments(self, locals())  # final_layer_norm_eps: EVA's ln_vision keeps torch's default eps
        if variant not in ("clip", "eva"):
            raise ValueError(f"vision_config.variant must be 'clip' or 'eva', got {variant!r}")
        _positive_ints("vision_config", self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "image_size", "patch_size"))
        _positive_floats("vision_config", self, ("layer_norm_eps", "final_layer_norm_eps"))
        if image_size % patch_size:
            raise ValueError(f"vision_config: image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        _check_heads("vision_config", hidden_size, num_attention_heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class XComposerQFormerConfig(PretrainedConfig):
    """The v1 perceive sampler: a BERT-base Q-Former whose learned queries cross-attend to the image
    every `cross_attention_frequency`-th layer, starting at layer 0."""

    model_type = "xcomposer_qformer"
    __eq__ = config_eq
    base_config_key = "qformer_config"

    def __init__(self, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="gelu", layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=1408,
                 num_query_tokens=64, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        _set_arguments(self, locals())
        _positive_ints("qformer_config", self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "cross_attention_frequency",
                                                "encoder_hidden_size", "num_query_tokens"))
        _positive_floats("qformer_config", self, ("layer_norm_eps",))
        _check_heads("qformer_config", hidden_size, num_attention_heads)


class XComposerTextConfig(PretrainedConfig):
    """The InternLM (v1) / InternLM2 (v2) decoder. v1 is `attention_bias=True`, MHA, rope_theta 1e4;
    v2 is GQA with rope_theta 1e6. `rope_dynamic_factor` f (XComposer-2.5: 2.0) turns on InternLM2's dynamic NTK
    scaling: a sequence of L > max_position_embeddings tokens is rotated with base
    rope_theta * (f * L / max_position_embeddings - (f - 1)) ** (head_dim / (head_dim - 2)), and sequences up to
    f * max_position_embeddings tokens are allowed (`max_sequence_length`). The low-rank adapters act on image rows only
    (`lora_scope="image"`, Partial LoRA of v2) or on every row (`"all"`, plain LoRA of v1);
    `lora_rank=0` means none (v1 after merging)."""

    model_type = "xcomposer_text"
    __eq__ = config_eq
    base_config_key = "text_config"

    def __init__(self, vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-5, attention_bias=False, attention_dropout=0.0, lora_rank=256,
                 lora_alpha=256.0, lora_dropout=0.05, lora_scope="image", lora_targets=None, initializer_range=0.02,
                 use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_dynamic_factor=None, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        _set_arguments(self, locals())
        self.lora_targets = list(LORA_TARGETS) if lora_targets is None else list(lora_targets)
        _positive_ints("text_config", self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        _positive_floats("text_config", self, ("rope_theta", "rms_norm_eps"))
        _check_heads("text_config", hidden_size, num_attention_heads)
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"text_config: num_key_value_heads ({num_key_value_heads}) must divide "
                             f"num_attention_heads ({num_attention_heads})")
        if lora_scope not in ("image", "all"):
            raise ValueError(f"text_config.lora_scope must be 'image' or 'all', got {lora_scope!r}")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"text_config.lora_targets: unknown {unknown}; choose from {list(LORA_TARGETS)}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"text_config.lora_rank must be an integer >= 0, got {lora_rank!r}")
        if rope_dynamic_factor is not None:  # not rope_scaling: transformers 5.x turns that name into a property
            _positive_floats("text_config", self, ("rope_dynamic_factor",))
            if rope_dynamic_factor < 1:
                raise ValueError(f"text_config.rope_dynamic_factor must be at least 1, got {rope_dynamic_factor!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the decoder takes: max_position_embeddings, times the dynamic NTK factor if any."""
        factor = getattr(self, "rope_dynamic_factor", None)
        return self.max_position_embeddings if factor is None else int(self.max_position_embeddings * factor)


def _sub_config(cls, value, where: str):
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**{k: v for k, v in value.items() if k != "model_type"})
    if isinstance(value, cls):
        return value
    raise TypeError(f"{where} must be a dict or a {cls.__name__}, got {type(value).__name__}")


class XComposerConfig(PretrainedConfig):
    """InternLM-XComposer(2): vision tower + connector + decoder.

    `image_token_id` marks one image position in `input_ids`; it defaults to `text_config.vocab_size`,
    an id outside the vocabulary so the model can never generate it. `num_image_tokens` (derived) is how
    many such positions one image takes: v2 one per patch, v1 the queries plus the start and end flags.

    High-resolution images (XComposer-2.5, XComposer2-4KHD; `hd_num` set, connector "mlp2x_gelu"): an image is
    resized and padded to a grid of tiles of `vision_config.image_size` px, at most `hd_num` tiles when a sample
    has one image and `hd_num_multi` each when it has several. `hd_clamp` (2.5) keeps a small image from growing
    past ceil(width / tile) tile columns; `hd_padding` puts the white padding at the "bottom" (the 2.5 code that
    ran) or centres it ("center", 4KHD). The count of image positions then depends on the image
    (`hd_num_image_tokens(rows, cols)`), so `num_image_tokens` is an error for these models.
    """

    model_type = "xcomposer"
    __eq__ = config_eq
    # qformer_config is left out: it is None for v2, which 4.5x's to_diff_dict cannot take for a listed sub-config.
    sub_configs = {"vision_config": XComposerVisionConfig, "text_config": XComposerTextConfig}

    def __init__(self, vision_config=None, text_config=None, qformer_config=None, connector="mlp2x_gelu",
                 image_token_id=None, hd_num=None, hd_num_multi=None, hd_padding=None, hd_clamp=None, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)
        attn_implementation = kwargs.get("attn_implementation")
        super().__init__(**kwargs)
        if connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {connector!r}")
        self.connector = connector
        self.vision_config = _sub_config(XComposerVisionConfig, vision_config, "vision_config")
        self.text_config = _sub_config(XComposerTextConfig, text_config, "text_config")
        self.qformer_config = None
        if connector == "perceive_sampler":
            if qformer_config is None:
                qformer_config = {"encoder_hidden_size": self.vision_config.hidden_size}
            self.qformer_config = _sub_config(XComposerQFormerConfig, qformer_config, "qformer_config")
            if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
                raise ValueError(
                    f"qformer_config.encoder_hidden_size ({self.qformer_config.encoder_hidden_size}) must equal "
                    f"vision_config.hidden_size ({self.vision_config.hidden_size})")
        self.image_token_id = self.text_config.vocab_size if image_token_id is None else image_token_id
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative integer, got {self.image_token_id!r}")
        self._set_tiles(hd_num, hd_num_multi, hd_padding, hd_clamp)
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        if attn_implementation is not None:  # the base class set it before the sub-configs existed
            for key in ("vision_config", "qformer_config", "text_config"):
                choice = attn_implementation
                if isinstance(choice, dict):
                    choice = choice.get(key, choice.get(""))
                if getattr(self, key) is not None:
                    getattr(self, key)._attn_implementation = choice

    # `config._attn_implementation = x` hands the choice down to the sub-configs listed in sub_configs (4.57+); the
    # Q-Former's cannot be listed (see above), so it follows here.
    @property
    def _attn_implementation(self):
        return PretrainedConfig._attn_implementation.fget(self)

    @_attn_implementation.setter
    def _attn_implementation(self, value):
        PretrainedConfig._attn_implementation.fset(self, value)
        qformer = self.__dict__.get("qformer_config")
        if qformer is not None:
            qformer._attn_implementation = value.get("qformer_config", qformer._attn_implementation) \
                if isinstance(value, dict) else value

    def _set_tiles(self, hd_num, hd_num_multi, hd_padding, hd_clamp) -> None:
        """The HD fields: all None (v1, v2), or a tile budget with its defaults (those of the 2.5 code that ran)."""
        if hd_num is None:
            given = {k: v for k, v in dict(hd_num_multi=hd_num_multi, hd_padding=hd_padding, hd_clamp=hd_clamp).items()
                     if v is not None}
            if given:
                raise ValueError(f"{sorted(given)} need hd_num (the tile budget of a high-resolution model)")
            self.hd_num = self.hd_num_multi = self.hd_padding = self.hd_clamp = None
            return
        if self.connector != "mlp2x_gelu":
            raise ValueError(f"hd_num (high-resolution tiles) needs connector 'mlp2x_gelu', not {self.connector!r}")
        self.hd_num = hd_num
        self.hd_num_multi = hd_num if hd_num_multi is None else hd_num_multi
        self.hd_padding = "bottom" if hd_padding is None else hd_padding
        self.hd_clamp = True if hd_clamp is None else hd_clamp
        _positive_ints("config", self, ("hd_num", "hd_num_multi"))
        if self.hd_padding not in HD_PADDINGS:
            raise ValueError(f"hd_padding must be one of {HD_PADDINGS}, got {self.hd_padding!r}")
        if not isinstance(self.hd_clamp, bool):
            raise ValueError(f"hd_clamp must be true or false, got {self.hd_clamp!r}")
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if grid % HD_MERGE:
            raise ValueError(f"high-resolution tiles merge {HD_MERGE}x{HD_MERGE} patches: the tile's patch grid "
                             f"(vision_config.image_size / patch_size = {grid}) must be a multiple of {HD_MERGE}")

    # The decoder's vocabulary. transformers 4.x's generation reads `config.vocab_size` (beam-search
    # `compute_transition_scores`, watermarking) where 5.x asks `get_text_config()`.
    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.text_config.vocab_size = value

    @property
    def dynamic_tiles(self) -> bool:
        """True for XComposer-2.5 / 4KHD: images as a global view plus a grid of tiles."""
        return getattr(self, "hd_num", None) is not None

    @property
    def hd_merge(self) -> int:
        """High-resolution models merge each hd_merge x hd_merge block of patch tokens into one (HD_MERGE)."""
        return HD_MERGE

    @property
    def num_image_tokens(self) -> int:
        if self.connector == "perceive_sampler":
            return self.qformer_config.num_query_tokens + 2
        if self.dynamic_tiles:
            raise ValueError("a high-resolution (hd_num) model has no fixed number of image tokens: it depends on "
                             "each image's tile grid; use config.hd_num_image_tokens(rows, cols)")
        return self.vision_config.num_patches

    def hd_num_image_tokens(self, rows: int, cols: int) -> int:
        """Image positions of one image whose tile grid is rows x cols (high-resolution models)."""
        if not self.dynamic_tiles:
            raise ValueError("hd_num_image_tokens is for high-resolution (hd_num) models")
        return hd_image_tokens(rows, cols, self.vision_config.image_size // self.vision_config.patch_size // HD_MERGE)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "XComposerConfig":
        """Full-size configurations of the published models, available offline."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_V2_TEXT = dict(vocab_size=92544, eos_token_id=[2, 92542], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=32768)
_V1_TEXT = dict(vocab_size=103170, eos_token_id=[2, 103028], hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, rope_theta=1e4, max_position_embeddings=2048,
                attention_bias=True, lora_rank=0, lora_scope="all", lora_targets=["wqkv", "w2", "w3"])
_EVA_G = dict(variant="eva", hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,  # BLIP-2 drops the 40th
              num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6)

# XComposer-2.5 and 4KHD: facts page UPSTREAM_FORMATS_HD.md. The decoder sizes and rope_theta are [unverified]
# (the Hub config.json files were not read); 2.5's dynamic factor 2.0 is [unverified] too, and its
# max_position_embeddings is not on the facts page: 24576 is the paper's "trained with 24K contexts" [guess].
# 4KHD's rope settings and hd_num default are not known: v2's decoder values and the evaluation wrappers' 25.
_HD_TEXT = dict(_V2_TEXT, max_position_embeddings=24576, rope_dynamic_factor=2.0)
_CLIP_HD = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)

PRESETS = {
    "xcomposer2-vl-7b": dict(connector="mlp2x_gelu", vision_config=dict(image_size=490), text_config=_V2_TEXT),
    "xcomposer2-7b": dict(connector="mlp2x_gelu", vision_config=dict(image_size=224), text_config=_V2_TEXT),
    "xcomposer-vl-7b": dict(connector="perceive_sampler", vision_config=_EVA_G, text_config=_V1_TEXT,
                            qformer_config=dict(encoder_hidden_size=1408)),
    "xcomposer-7b": dict(connector="perceive_sampler", vision_config=_EVA_G, text_config=_V1_TEXT,
                         qformer_config=dict(encoder_hidden_size=1408)),
    # internlm-xcomposer2d5-7b: 560 px tiles, 24 tiles for one image, 6 each for several, bottom padding [ran]
    "xcomposer2d5-7b": dict(connector="mlp2x_gelu", vision_config=dict(_CLIP_HD, image_size=560), text_config=_HD_TEXT,
                            hd_num=24, hd_num_multi=6, hd_padding="bottom", hd_clamp=True),
    # internlm-xcomposer2-4khd-7b: 336 px tiles, centred padding, no clamp [4KHD, not run]
    "xcomposer2-4khd-7b": dict(connector="mlp2x_gelu", vision_config=dict(_CLIP_HD, image_size=336),
                               text_config=_V2_TEXT, hd_num=25, hd_num_multi=25, hd_padding="center", hd_clamp=False),
}

XComposerConfig.register_for_auto_class()
