"""Every difference between the transformers releases this remote code supports, in one place.

The model, config, tokenizer and processor modules read as if there were one transformers; what moved
between 4.45 and 5.24 is bridged here, by looking for the feature rather than comparing versions where
possible. When a release leaves the supported range, its branch here is the one thing to delete.
Importing this module checks the installed release: older than the range is an ImportError that names
both, newer than the newest tested release is a one-line warning.
"""

import functools
import inspect
import warnings

import torch
import transformers
from packaging import version
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

OLDEST, NEWEST_TESTED = "4.45.0", "5.24.0"

_installed = version.parse(transformers.__version__)
if _installed < version.parse(OLDEST):
    raise ImportError(f"InternLM-XComposer's remote code supports transformers {OLDEST} to {NEWEST_TESTED}; "
                      f"transformers {transformers.__version__} is installed. Upgrade it: "
                      f"pip install 'transformers>={OLDEST}'")
if _installed.release[:2] > version.parse(NEWEST_TESTED).release[:2]:
    warnings.warn(f"InternLM-XComposer's remote code is tested with transformers {OLDEST} to {NEWEST_TESTED}; "
                  f"{transformers.__version__} is newer and untested.", stacklevel=2)


# --------------------------------------------------------------------------- modules and initialisation

try:  # 4.52+
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:
    class GradientCheckpointingLayer(nn.Module):
        """A layer that gradient_checkpointing_enable() can checkpoint: it finds the `gradient_checkpointing`
        flag and sets `_gradient_checkpointing_func`, as 4.52+'s class of the same name expects."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

try:  # 5.x: these skip tensors that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # 4.x: from_pretrained only initialises what the checkpoint lacks, so torch's own are right
    from torch.nn import init  # noqa: F401


def config_eq(self, other) -> bool:
    """Configs are equal when their attributes are. 5.5+ turns config classes into dataclasses whose generated
    __eq__ compares only the base class's fields, so two of ours with different sizes compared equal; a class
    that defines __eq__ in its body keeps it."""
    return isinstance(other, type(self)) and self.__dict__ == other.__dict__


def set_attn_implementation(model, name: str) -> None:
    """Switch the attention kernel of a loaded model and all its towers (4.45-4.56 lack
    model.set_attn_implementation; our modules read the choice from their config at every call)."""
    config = model.config
    for sub in (config, *(getattr(config, key, None) for key in ("vision_config", "qformer_config", "text_config"))):
        if sub is not None:
            sub._attn_implementation = name


# --------------------------------------------------------------------------- attention kernels

try:  # 4.48+
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:
    ALL_ATTENTION_FUNCTIONS = None


def registered_attention(name: str):
    """A kernel of transformers' attention registry (flash_attention_2/3, flex_attention, user-registered
    ones), with the registry's signature (module, query, key, value, attention_mask, scaling, dropout).
    4.45-4.47 have no registry: there FlashAttention-2 is called through its older helper."""
    if ALL_ATTENTION_FUNCTIONS is not None and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    if ALL_ATTENTION_FUNCTIONS is None and name == "flash_attention_2":
        return _flash_attention_2_before_registry
    available = ["eager", "sdpa", *(ALL_ATTENTION_FUNCTIONS.keys() if ALL_ATTENTION_FUNCTIONS is not None else [])]
    raise ValueError(f"attn_implementation {name!r} is not available with transformers {transformers.__version__}; "
                     f"choose from {sorted(set(available))}")


def _flash_attention_2_before_registry(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    # (B, H, L, d) -> (B, L, H, d); attention_mask is the 2-D padding mask (or None), as the registry's kernel takes
    out = _flash_attention_forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                                   query.shape[2], is_causal=module.is_causal, dropout=dropout, softmax_scale=scaling)
    return out, None


# --------------------------------------------------------------------------- caches and outputs


def cache_update(cache, key, value, layer_idx: int, cache_position):
    """StaticCache before 5.5 writes at cache_kwargs["cache_position"]; growing caches and 5.5+ ignore it."""
    return cache.update(key, value, layer_idx, {"cache_position": cache_position})


# 5.24 renamed the cache in model inputs and outputs from past_key_values to cache.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache, past_key_values, where: str):
    """The cache a forward was given under either name. Where the name is `cache` (5.24+), `past_key_values`
    gets the FutureWarning transformers' own models give for it."""
    if past_key_values is None:
        return cache
    if CACHE_FIELD == "cache" and not torch.compiler.is_compiling():
        warnings.warn(f"`past_key_values` is deprecated for `{where}` since transformers 5.24; pass `cache` instead.",
                      FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def static_cache_length(cache) -> int | None:
    """The fixed key length of a static cache, None for a growing one. The method was get_max_length (4.45),
    get_max_cache_shape (4.47-5.1x), then get_max_length again (5.20+); since 4.57 it takes a layer index,
    and 5.20+ without one asks every layer, which fails on a cache that has none yet."""
    method = _max_length_method(type(cache))
    length = getattr(cache, method.__name__)(0) if _takes_layer_index(method) else getattr(cache, method.__name__)()
    return length if isinstance(length, int) and length > 0 else None


@functools.lru_cache(maxsize=None)
def _max_length_method(cache_class):
    return getattr(cache_class, "get_max_cache_shape", None) or cache_class.get_max_length


@functools.lru_cache(maxsize=None)
def _takes_layer_index(method) -> bool:
    return "layer_idx" in inspect.signature(method).parameters


# from_pretrained's dtype argument, and the config attribute saved as the weights' dtype: torch_dtype before
# 4.56, dtype since (5.x still takes torch_dtype, with a warning).
DTYPE_ARG = "dtype" if _installed >= version.parse("4.56.0") else "torch_dtype"


def declare_processor_parts(processor_class, **parts) -> None:
    """4.x's ProcessorMixin finds, checks and loads a processor's parts from class attributes (attributes,
    image_processor_class, tokenizer_class, valid_kwargs); 5.x reads the __init__ signature and warns about them."""
    if _installed.major < 5:
        for name, value in parts.items():
            setattr(processor_class, name, value)


def get_warmup(training_args) -> float:
    """The warm-up TrainingArguments ask for, as set_warmup takes it (4.x may hold a fraction in warmup_ratio)."""
    return training_args.warmup_steps or getattr(training_args, "warmup_ratio", None) or 0


def set_warmup(training_args, warmup: float) -> None:
    """Warm-up as steps (>= 1) or as a fraction of training (< 1): 5.x reads a fraction from warmup_steps,
    4.x only from warmup_ratio (its warmup_steps must be an int)."""
    if _installed.major < 5 and 0 < warmup < 1:
        training_args.warmup_steps, training_args.warmup_ratio = 0, warmup
    else:
        training_args.warmup_steps = int(warmup) if warmup >= 1 and float(warmup).is_integer() else warmup


def return_dict_default(config) -> bool:
    """config.return_dict, off in TorchScript mode as 4.x's use_return_dict has it. Not use_return_dict itself:
    on 5.x reading it logs a deprecation warning (5.x has no torchscript flag)."""
    return getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)
