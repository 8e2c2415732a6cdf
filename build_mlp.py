"""The XComposer2 vision projector: CLIP patch features -> decoder width."""

from torch import nn


def build_vision_projector(config) -> nn.Sequential:
    """`mlp2x_gelu` as in LLaVA-1.5 and XComposer2: Linear, exact GELU, Linear.

    A Sequential keeps upstream's key names (`vision_proj.0.*`, `vision_proj.2.*`)."""
    if config.connector != "mlp2x_gelu":
        raise ValueError(f"build_vision_projector builds 'mlp2x_gelu', not {config.connector!r}")
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
