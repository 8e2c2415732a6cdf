"""The XComposer2 vision projector: CLIP patch features -> decoder width."""

from torch import nn


def build_vision_projector(config) -> nn.Sequential:
    """`mlp2x_gelu` as in LLaVA-1.5 and XComposer2: Linear, exact GELU, Linear.

    A Sequential keeps upstream's key names (`vision_proj.0.*`, `vision_proj.2.*`). High-resolution models
    (XComposer-2.5 / 4KHD) project merged tokens: config.hd_merge**2 patches side by side, so the input is
    that many times wider."""
    if config.connector != "mlp2x_gelu":
        raise ValueError(f"build_vision_projector builds 'mlp2x_gelu', not {config.connector!r}")
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    if config.dynamic_tiles:
        vision_width *= config.hd_merge**2
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
