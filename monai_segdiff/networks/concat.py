"""Image-concatenated denoiser (Wolleb et al., "Diffusion Models for Implicit Image Segmentation
Ensembles", MIDL 2022; also the backbone of CIMD, Rahman et al., CVPR 2023).

The noisy mask ``x_t`` and the image are concatenated on the channel axis and denoised by one
``monai.networks.nets.DiffusionModelUNet``. ``condition`` is the identity, so every step runs the
whole network; keep it lean (no attention at high resolution, few channels) for CPU speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn


class ConcatDenoiser(nn.Module):
    """Denoiser ``eps/x0/v_theta([x_t, image], t)``.

    Args:
        spatial_dims: 2 or 3.
        image_channels: channels of the conditioning image.
        num_classes: mask channels (one-hot, background included).
        channels: feature channels per level.
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level.
        norm_num_groups: group-norm groups.
        num_head_channels: channels per attention head.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, False),
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
    ) -> None:
        super().__init__()
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=num_classes + image_channels,
            out_channels=num_classes,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )

    def condition(self, image: torch.Tensor) -> torch.Tensor:
        """The image itself: this network has no separate image path."""
        return image

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x_t, cond], dim=1), timesteps=t)
