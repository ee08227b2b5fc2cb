"""Deterministic baseline: MONAI ``UNet`` with dropout, for comparisons and MC-dropout uncertainty
(Gal & Ghahramani 2016, as in MONAI Label's epistemic active-learning strategy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class BaselineUNet(nn.Module):
    """Image -> class logits. Keeps dropout active at inference when ``mc_dropout`` is on.

    Args:
        spatial_dims: 2 or 3.
        image_channels: input channels.
        num_classes: output classes (background included).
        channels: feature channels per level (the MONAI Label default family, 16-128).
        dropout: dropout probability.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=image_channels,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=2,
            dropout=dropout,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image)
