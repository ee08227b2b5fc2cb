"""DermoSegDiff (Bozorgpour et al., "DermoSegDiff: A Boundary-aware Segmentation Diffusion Model for
Skin Lesion Delineation", PRIME/MICCAI workshop 2023): a dual-encoder denoiser in which the image
encoder gates the noisy-mask encoder at every level, and whose decoder reads skip connections
from both encoders. Its boundary-aware loss lives in :class:`monai_segdiff.losses.BoundaryWeights`
(usable with any network: ``extra.boundary_loss: true``).

As for MedSegDiff here, the image path runs once per image in ``condition`` (gates and values for
every level are precomputed there) and the per-step mask path is light; 2D and 3D, any number of
classes, any size divisible by ``2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FiLM, ImageEncoderDecoder, TimeEmbedding, conv, pointwise, resize, two_path_widths


class ImageGate(nn.Module):
    """Image-gated mask features: ``m_x * sigmoid(g(m_I)) + v(m_I)``.

    ``g`` and ``v`` are pointwise projections of the image features; they depend only on the image,
    so :meth:`project` runs once per image and :meth:`forward` is two element-wise operations.
    """

    def __init__(self, spatial_dims: int, image_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(image_channels, 2 * channels, 1)

    def project(self, m_i: torch.Tensor) -> torch.Tensor:
        """``[B, C_I, ...] -> [B, 2C, ...]``: gate logits and values, stacked on channels."""
        return self.proj(m_i)

    def forward(self, m_x: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
        gate, value = gv.chunk(2, dim=1)
        return m_x * torch.sigmoid(gate) + value


class DermoSegDiff(nn.Module):
    """Dual-encoder conditional denoiser with image-gated mask features.

    Args:
        spatial_dims: 2 or 3.
        image_channels: input image channels (2.5D context included).
        num_classes: mask channels (one-hot, background included).
        channels: image-path channels per level.
        mask_channels: mask-path channels per level (default: a quarter of ``channels``, >= 8); the
            per-step cost scales with these.
        norm_num_groups: group-norm groups (capped at 8, as in the other two-path networks).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        mask_channels: Sequence[int] | None = None,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        ch, mch, groups = two_path_widths(channels, mask_channels, norm_num_groups)
        self.spatial_dims = spatial_dims
        self.image_path = ImageEncoderDecoder(spatial_dims, image_channels, ch, groups=groups)
        self.head_image = pointwise(spatial_dims, ch[0], mch[0])
        self.gates = nn.ModuleList(ImageGate(spatial_dims, c, m) for c, m in zip(ch[1:], mch[1:]))
        emb = mch[1] * 2
        self.temb = TimeEmbedding(emb)
        # mask encoder: starts at half resolution (full-resolution detail enters in the head)
        self.inp = conv(spatial_dims, num_classes, mch[1], stride=2, groups=groups)
        self.down = nn.ModuleList(conv(spatial_dims, mch[i], mch[i + 1], stride=2, groups=groups) for i in range(1, len(mch) - 1))
        self.enc = nn.ModuleList(conv(spatial_dims, m, m, groups=groups) for m in mch[1:])
        self.film = nn.ModuleList(FiLM(emb, m) for m in mch[1:])
        self.mid = conv(spatial_dims, mch[-1] * 2, mch[-1], groups=groups)
        # decoder: upsampled features + mask-encoder skip + image-encoder skip (gate values)
        self.up = nn.ModuleList(conv(spatial_dims, mch[i + 1] + 2 * mch[i], mch[i], groups=groups) for i in range(1, len(mch) - 1))
        self.out = nn.Sequential(
            pointwise(spatial_dims, mch[1] + mch[0] + num_classes, mch[0]), nn.SiLU(), pointwise(spatial_dims, mch[0], num_classes)
        )

    def condition(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Once per image: full-resolution image features for the head, then gate logits and values
        for every lower level."""
        feats = self.image_path(image)
        return [self.head_image(feats[0])] + [g.project(f) for g, f in zip(self.gates, feats[1:])]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        temb = self.temb(t)
        h = self.inp(x_t)
        skips, values = [], []
        for i, gv in enumerate(cond[1:]):
            if i > 0:
                h = self.down[i - 1](h)
            h = self.film[i](self.enc[i](self.gates[i](h, gv)), temb)
            skips.append(h)
            values.append(gv.chunk(2, dim=1)[1])
        h = self.mid(torch.cat([h, values[-1]], dim=1))
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h, size=skips[i].shape[2:], mode="nearest")
            h = self.up[i](torch.cat([h, skips[i], values[i]], dim=1))
        return self.out(torch.cat([resize(h, x_t.shape[2:]), cond[0], x_t], dim=1))
