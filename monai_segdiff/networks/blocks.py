"""Small building blocks shared by the two-path networks (MedSegDiff, DermoSegDiff, CIMD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn


def conv(spatial_dims: int, cin: int, cout: int, stride: int = 1, groups: int = 8, act: bool = True) -> nn.Module:
    """3x3 convolution + group norm + SiLU (MONAI ``Convolution``)."""
    g = min(groups, cout)
    while cout % g:
        g -= 1
    return Convolution(
        spatial_dims, cin, cout, strides=stride, kernel_size=3,
        act="SWISH" if act else None, norm=("GROUP", {"num_groups": g, "num_channels": cout}),
    )


def two_path_widths(
    channels: Sequence[int], mask_channels: Sequence[int] | None, norm_num_groups: int
) -> tuple[list[int], list[int], int]:
    """Image-path widths, mask-path widths (default a quarter, >= 8) and group-norm groups (<= 8)
    shared by the two-path networks."""
    ch = list(channels)
    mch = list(mask_channels or [max(8, c // 4) for c in ch])
    if len(ch) < 2 or len(mch) != len(ch):
        raise ValueError("need >= 2 levels and one mask_channels entry per level of channels")
    return ch, mch, min(norm_num_groups, 8)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of feature maps ``[B, C, *spatial]`` to ``size``; a no-op when they already
    have it (the two-path networks' mask path up to the output head's full resolution)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear" if x.ndim == 4 else "trilinear")


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep embedding (Ho et al. 2020) followed by an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.SiLU(), nn.Linear(dim * 2, dim * 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(get_timestep_embedding(t, self.dim).to(next(self.mlp.parameters()).dtype))


class FiLM(nn.Module):
    """Scale and shift features by the time embedding."""

    def __init__(self, temb_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(temb_dim * 2, channels * 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(temb).chunk(2, dim=1)
        shape = (*scale.shape, *([1] * (x.ndim - 2)))
        return x * (1 + scale.reshape(shape)) + shift.reshape(shape)


class ImageEncoderDecoder(nn.Module):
    """The heavy image path: a small UNet whose decoder features at every level are returned
    (finest first), so the light mask path can be conditioned at each resolution.

    ``stem_stride`` 2 starts with a strided convolution, as MONAI's ``UNet`` does: every level then
    runs at half resolution or below. In 3D the full-resolution decoder convolution alone was 27 % of
    a training step (64x64x32 patches), so this cuts the cost of 3D models most."""

    def __init__(
        self, spatial_dims: int, in_channels: int, channels: Sequence[int], groups: int = 8, stem_stride: int = 1
    ) -> None:
        super().__init__()
        ch = list(channels)
        self.stem = conv(spatial_dims, in_channels, ch[0], stride=stem_stride, groups=groups)  # one conv only
        self.down = nn.ModuleList(
            nn.Sequential(conv(spatial_dims, ch[i], ch[i + 1], stride=2, groups=groups), conv(spatial_dims, ch[i + 1], ch[i + 1], groups=groups))
            for i in range(len(ch) - 1)
        )
        self.up = nn.ModuleList(conv(spatial_dims, ch[i + 1] + ch[i], ch[i], groups=groups) for i in range(len(ch) - 1))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stem(image)]
        for down in self.down:
            skips.append(down(skips[-1]))
        feats = [skips[-1]]
        for i in reversed(range(len(self.up))):
            x = F.interpolate(feats[0], size=skips[i].shape[2:], mode="nearest")
            feats.insert(0, self.up[i](torch.cat([x, skips[i]], dim=1)))
        return feats


def pointwise(spatial_dims: int, cin: int, cout: int) -> nn.Module:
    """A 1x1 (x1) convolution with bias: MONAI's ``Conv`` factory's ``nn.Conv2d`` / ``nn.Conv3d``."""
    return Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=1)
