"""The XComposer2 vision projector: CLIP patch features -> decoder width."""

from torch import nn

try:  # as remote code, inside transformers' dynamic package
    from .configuration_xcomposer import HD_MERGE
except ImportError:  # from a checkout, where scripts and tests import the flat modules directly
    try:  # a try of its own: transformers 4.x's scan for missing packages skips only try blocks
        from configuration_xcomposer import HD_MERGE
    except ImportError:
        raise


def build_vision_projector(config) -> nn.Sequential:
    """`mlp2x_gelu` as in LLaVA-1.5 and XComposer2: Linear, exact GELU, Linear.

    A Sequential keeps upstream's key names (`vision_proj.0.*`, `vision_proj.2.*`). High-resolution models
    (XComposer-2.5 / 4KHD) project merged tokens: HD_MERGE x HD_MERGE patches side by side, so the input is
    that many times wider."""
    if config.connector != "mlp2x_gelu":
        raise ValueError(f"build_vision_projector builds 'mlp2x_gelu', not {config.connector!r}")
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    if config.dynamic_tiles:
        vision_width *= HD_MERGE**2
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
