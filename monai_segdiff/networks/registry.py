"""Builders of the seed-paper variants (MedSegDiff, MedSegDiff-V2, DermoSegDiff, CIMD), looked up by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import SegDiffConfig
from .cimd import CIMD
from .dermosegdiff import DermoSegDiff
from .medsegdiff import MedSegDiff
from .medsegdiff_v2 import MedSegDiffV2


def build(cfg: SegDiffConfig, **common: Any) -> nn.Module:
    """Build ``cfg.network`` with the shared arguments ``spatial_dims, image_channels, num_classes``."""
    kw = dict(common, channels=cfg.channels, norm_num_groups=cfg.norm_num_groups)
    if cfg.network == "medsegdiff":
        return MedSegDiff(**kw, **cfg.extra.get("medsegdiff", {}))
    if cfg.network == "medsegdiff_v2":
        return MedSegDiffV2(**kw, **cfg.extra.get("medsegdiff_v2", {}))
    if cfg.network == "dermosegdiff":
        return DermoSegDiff(**kw, **cfg.extra.get("dermosegdiff", {}))
    if cfg.network == "cimd":
        return CIMD(**kw, **cfg.extra.get("cimd", {}))
    raise ValueError(f"unknown network {cfg.network!r}")
