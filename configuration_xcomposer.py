"""Configuration of InternLM-XComposer (v1, 2023) and InternLM-XComposer2 (v2, 2024).

One config serves both generations. `connector` selects the path between image and decoder:
- "mlp2x_gelu": v2. CLIP ViT-L/14 patch features -> MLP projector -> InternLM2 with Partial LoRA.
- "perceive_sampler": v1. EVA-CLIP ViT-g -> BLIP-2 Q-Former with learned queries -> projection,
  wrapped in learned start/end flags -> InternLM (LoRA merged, or as plain adapters).
"""

import os
import shutil

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Every folder we write loads through the Auto classes with trust_remote_code from these flat modules.
AUTO_MAP = {
    "AutoConfig": "configuration_xcomposer.XComposerConfig",
    "AutoModel": "modeling_xcomposer.XComposerModel",
    "AutoModelForCausalLM": "modeling_xcomposer.XComposerForCausalLM",
    "AutoModelForImageTextToText": "modeling_xcomposer.XComposerForCausalLM",
    "AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None],
    "AutoProcessor": "processing_xcomposer.XComposerProcessor",
}

# The flat modules a model folder needs beside its weights, copied by every writer of a folder.
CODE_FILES = ("configuration_xcomposer.py", "modeling_xcomposer.py", "build_mlp.py", "tokenization_internlm.py",
              "processing_xcomposer.py", "model_folder.py")


def _check_heads(name: str, hidden_size: int, num_heads: int) -> None:
    if num_heads <= 0 or hidden_size % num_heads:
        raise ValueError(f"{name}: num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size})")


class XComposerVisionConfig(PreTrainedConfig):
    """A pre-LN ViT. `variant` "clip" is OpenAI CLIP (pre_layrnorm, q/k/v biases, quick_gelu);
    "eva" is EVA-CLIP as built by BLIP-2 (conv bias, q_bias/v_bias only, exact GELU, ln_vision at the end)."""

    model_type = "xcomposer_vision"
    base_config_key = "vision_config"

    variant: str = "clip"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 490
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    final_layer_norm_eps: float = 1e-5  # EVA's ln_vision keeps torch's default eps
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.variant not in ("clip", "eva"):
            raise ValueError(f"vision_config.variant must be 'clip' or 'eva', got {self.variant!r}")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config: image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class XComposerQFormerConfig(PreTrainedConfig):
    """The v1 perceive sampler: a BERT-base Q-Former whose learned queries cross-attend to the image
    every `cross_attention_frequency`-th layer, starting at layer 0."""

    model_type = "xcomposer_qformer"
    base_config_key = "qformer_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 64
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_heads("qformer_config", self.hidden_size, self.num_attention_heads)
        if self.cross_attention_frequency <= 0 or self.num_query_tokens <= 0:
            raise ValueError("qformer_config: cross_attention_frequency and num_query_tokens must be positive")


class XComposerTextConfig(PreTrainedConfig):
    """The InternLM (v1) / InternLM2 (v2) decoder. v1 is `attention_bias=True`, MHA, rope_theta 1e4;
    v2 is GQA with rope_theta 1e6. The low-rank adapters act on image rows only
    (`lora_scope="image"`, Partial LoRA of v2) or on every row (`"all"`, plain LoRA of v1);
    `lora_rank=0` means none (v1 after merging)."""

    model_type = "xcomposer_text"
    base_config_key = "text_config"

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    attention_dropout: float = 0.0
    lora_rank: int = 256
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_scope: str = "image"
    lora_targets: list[str] | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 2

    LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.lora_scope not in ("image", "all"):
            raise ValueError(f"text_config.lora_scope must be 'image' or 'all', got {self.lora_scope!r}")
        if self.lora_targets is None:
            self.lora_targets = list(self.LORA_TARGETS)
        unknown = sorted(set(self.lora_targets) - set(self.LORA_TARGETS))
        if unknown:
            raise ValueError(f"text_config.lora_targets: unknown {unknown}; choose from {list(self.LORA_TARGETS)}")
        if self.lora_rank < 0:
            raise ValueError(f"text_config.lora_rank must be >= 0, got {self.lora_rank}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class XComposerConfig(PreTrainedConfig):
    """InternLM-XComposer(2): vision tower + connector + decoder.

    `image_token_id` marks one image position in `input_ids`; it defaults to `text_config.vocab_size`,
    an id outside the vocabulary so the model can never generate it. `num_image_tokens` (derived) is how
    many such positions one image takes: v2 one per patch, v1 the queries plus the start and end flags.
    """

    model_type = "xcomposer"
    sub_configs_defaults = {
        "vision_config": XComposerVisionConfig,
        "text_config": XComposerTextConfig,
        "qformer_config": SubConfigSpec(XComposerQFormerConfig, optional=True),
    }

    vision_config: dict | XComposerVisionConfig | None = None
    text_config: dict | XComposerTextConfig | None = None
    qformer_config: dict | XComposerQFormerConfig | None = None
    connector: str = "mlp2x_gelu"
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    CONNECTORS = ("mlp2x_gelu", "perceive_sampler")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        if self.connector not in self.CONNECTORS:
            raise ValueError(f"connector must be one of {self.CONNECTORS}, got {self.connector!r}")
        if self.connector == "perceive_sampler":
            if self.qformer_config is None:
                self.qformer_config = XComposerQFormerConfig(encoder_hidden_size=self.vision_config.hidden_size)
            if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
                raise ValueError(
                    f"qformer_config.encoder_hidden_size ({self.qformer_config.encoder_hidden_size}) must equal "
                    f"vision_config.hidden_size ({self.vision_config.hidden_size})"
                )
        if self.image_token_id is None:
            self.image_token_id = self.text_config.vocab_size
        if self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id ({self.image_token_id}) must be >= text_config.vocab_size "
                f"({self.text_config.vocab_size}) so the model can never generate it"
            )

    def save_pretrained(self, save_directory, **kwargs):
        """Also copies the remote-code modules, so the folder loads with trust_remote_code anywhere."""
        super().save_pretrained(save_directory, **kwargs)
        copy_code_files(save_directory)

    @property
    def is_v1(self) -> bool:
        return self.connector == "perceive_sampler"

    @property
    def num_image_tokens(self) -> int:
        if self.is_v1:
            return self.qformer_config.num_query_tokens + 2
        return self.vision_config.num_patches

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

PRESETS = {
    "xcomposer2-vl-7b": dict(connector="mlp2x_gelu", vision_config=dict(image_size=490), text_config=_V2_TEXT),
    "xcomposer2-7b": dict(connector="mlp2x_gelu", vision_config=dict(image_size=224), text_config=_V2_TEXT),
    "xcomposer-vl-7b": dict(connector="perceive_sampler", vision_config=_EVA_G, text_config=_V1_TEXT,
                            qformer_config=dict(encoder_hidden_size=1408)),
    "xcomposer-7b": dict(connector="perceive_sampler", vision_config=_EVA_G, text_config=_V1_TEXT,
                         qformer_config=dict(encoder_hidden_size=1408)),
}


def copy_code_files(save_directory) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        source, target = os.path.join(here, name), os.path.join(save_directory, name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
