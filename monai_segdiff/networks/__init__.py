"""Networks, one per file, all built from a ``SegDiffConfig`` by ``build_network``.

Denoisers expose ``condition(image) -> cond`` (once per image batch) and
``forward(x_t, t, cond) -> prediction`` (once per step, all ensemble members); the sampler knows
only this interface. The baseline UNet maps ``image -> logits``.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import SegDiffConfig
from . import registry  # the seed-paper variants, built by name
from .concat import ConcatDenoiser
from .unet import BaselineUNet


def build_network(cfg: SegDiffConfig) -> nn.Module:
    """Rebuild the network a config describes (weights are loaded separately)."""
    common = dict(spatial_dims=cfg.spatial_dims, image_channels=cfg.network_channels, num_classes=cfg.num_classes)
    if cfg.network == "unet":
        return BaselineUNet(**common, channels=cfg.channels, dropout=cfg.dropout)
    if cfg.network == "concat":
        return ConcatDenoiser(
            **common,
            channels=cfg.channels,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=math.gcd(cfg.num_head_channels, cfg.channels[-1]),
        )
    return registry.build(cfg, **common)


__all__ = ["BaselineUNet", "ConcatDenoiser", "build_network"]
