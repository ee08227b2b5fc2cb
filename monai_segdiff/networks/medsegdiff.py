"""MedSegDiff (Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic
Model", MIDL 2023): a noisy-mask path conditioned on an image path at every encoder level by
dynamic conditional encoding, with the FF-Parser filtering the mask features in frequency space.

Built for speed: the image path (a small UNet) runs once per image in ``condition``; the per-step
mask path is light. Fusion layers are created in ``__init__`` (so they are trained), sizes are free
(the FF-Parser weight is resampled to any frequency grid), 2D and 3D, any number of classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import dice_ce
from .blocks import FiLM, ImageEncoderDecoder, TimeEmbedding, conv, pointwise, resize, two_path_widths


class FFParser(nn.Module):
    """Learnable complex filter on the Fourier spectrum of features (MedSegDiff's FF-Parser).

    ``x -> irfftn(rfftn(x) * W)``, computed in fp32 over the spatial axes. ``W`` is a complex weight
    map stored at ``size`` and resampled (bilinear / trilinear) to the spectrum's size, so any input
    size works. Initialised to 1 + 0j: an identity map.
    """

    def __init__(self, spatial_dims: int, channels: int, size: int = 16) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        shape = (channels, *([size] * (spatial_dims - 1)), size // 2 + 1)
        self.weight = nn.Parameter(torch.stack([torch.ones(shape), torch.zeros(shape)], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        spec = torch.fft.rfftn(x.float(), dim=dims, norm="ortho")
        w = self.weight.movedim(-1, 0)  # [2, C, *size]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        w = F.interpolate(w, size=spec.shape[2:], mode=mode, align_corners=True)
        spec = spec * torch.complex(w[0], w[1])[None]
        return torch.fft.irfftn(spec, s=x.shape[2:], dim=dims, norm="ortho").to(x.dtype)


class DynamicConditionalEncoding(nn.Module):
    """Fuse image features ``m_I`` into mask features ``m_x``: ``(LN(m_I) * LN(m_x)) * m_I`` (MedSegDiff
    eq. 3; LN as group norm with one group, i.e. layer norm over channels and space), added back to
    the mask features as a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_i = nn.GroupNorm(1, channels)
        self.norm_x = nn.GroupNorm(1, channels)

    def forward(self, m_x: torch.Tensor, m_i: torch.Tensor) -> torch.Tensor:
        return m_x + self.norm_i(m_i) * self.norm_x(m_x) * m_i


class MedSegDiff(nn.Module):
    """Two-path conditional denoiser.

    Args:
        spatial_dims: 2 or 3.
        image_channels: input image channels (2.5D context included).
        num_classes: mask channels (one-hot, background included).
        channels: image-path channels per level.
        mask_channels: mask-path channels per level (default: a quarter of ``channels``, >= 8); the
            per-step cost scales with these.
        norm_num_groups: group-norm groups of the image path.
        ff_parser: apply the FF-Parser on the mask path.
        ff_size: stored size of the FF-Parser weight maps.
        anchor: add the anchor head: a deterministic prediction from the image path, supervised
            with Dice + CE (``extra_loss``) and fed to the mask path as an extra condition (its
            class probabilities scaled to [-1, 1], detached); never blended into the samples.
        anchor_weight: weight of the anchor's Dice + CE in the training loss.
        image_stride: 2 runs the whole image path at half resolution or below (a strided stem, as in
            MONAI's ``UNet``); the mask path then gains a level and the output head sees the image
            features and the anchor upsampled. Training steps are 2.8x cheaper on 64x64x32 patches
            and 2.1x on 2.5D slices (BENCHMARKS.md, session 7).
            Sizes must then be divisible by ``2 ** len(channels)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        mask_channels: Sequence[int] | None = None,
        norm_num_groups: int = 8,
        ff_parser: bool = True,
        ff_size: int = 16,
        anchor: bool = False,
        anchor_weight: float = 1.0,
        image_stride: int = 1,
    ) -> None:
        super().__init__()
        if image_stride not in (1, 2):
            raise ValueError(f"image_stride must be 1 or 2, got {image_stride}")
        ch, mch, groups = two_path_widths(channels, mask_channels, norm_num_groups)
        self.image_path = ImageEncoderDecoder(spatial_dims, image_channels, ch, groups=groups, stem_stride=image_stride)
        self.image_stride = image_stride
        # mask-path widths, one per level from half resolution: the image levels below the top (stride
        # 1), or all of them (stride 2: the image path's top level is at half resolution too)
        levels = mch[1:] if image_stride == 1 else mch
        self.project = nn.ModuleList(pointwise(spatial_dims, c, m) for c, m in zip(ch, mch))
        self.temb = TimeEmbedding(mch[1] * 2)
        # the per-step mask path starts at half resolution (the cost of CPU sampling lives here);
        # full-resolution detail comes from the image features in the output head
        # optional anchor: its probabilities enter next to x_t (mask-path input and output head)
        self.anchor = pointwise(spatial_dims, ch[0], num_classes) if anchor else None
        self.anchor_weight = float(anchor_weight)
        self._anchor_logits: torch.Tensor | None = None
        self._x0: torch.Tensor | None = None
        mask_in = num_classes * (2 if anchor else 1)
        self.inp = conv(spatial_dims, mask_in, levels[0], stride=2, groups=groups)
        self.down = nn.ModuleList(
            conv(spatial_dims, levels[i], levels[i + 1], stride=2, groups=groups) for i in range(len(levels) - 1)
        )
        self.ff = nn.ModuleList(FFParser(spatial_dims, m, ff_size) if ff_parser else nn.Identity() for m in levels)
        self.fuse = nn.ModuleList(DynamicConditionalEncoding(m) for m in levels)
        self.film = nn.ModuleList(FiLM(mch[1] * 2, m) for m in levels)
        self.mid = conv(spatial_dims, levels[-1], levels[-1], groups=groups)
        self.up = nn.ModuleList(
            conv(spatial_dims, levels[i + 1] + levels[i], levels[i], groups=groups) for i in range(len(levels) - 1)
        )
        self.out = nn.Sequential(
            pointwise(spatial_dims, levels[0] + mch[0] + mask_in, mch[0]), nn.SiLU(), pointwise(spatial_dims, mch[0], num_classes)
        )

    def _condition(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return self._condition_from(self.image_path(image), image)

    def _condition_from(self, feats: list[torch.Tensor], image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """:meth:`condition` from the image path's features ``feats`` (finest first), plus the anchor logits."""
        cond = [p(f) for p, f in zip(self.project, feats)]
        if self.image_stride == 2:  # the output head's features at full resolution, once per image
            cond.insert(0, resize(cond[0], image.shape[2:]))
        if self.anchor is None:
            return cond, None
        logits = resize(self.anchor(feats[0]), image.shape[2:])
        return cond + [2 * torch.softmax(logits.detach().float(), dim=1).to(logits.dtype) - 1], logits

    def condition(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Image features projected to the mask path's widths (once per image): first those of the
        output head at full resolution, then one per mask-path level; with the anchor head, its
        prediction (scaled to [-1, 1]) is the last entry."""
        return self._condition(image)[0]

    def anchor_probabilities(self, cond: list[torch.Tensor]) -> torch.Tensor | None:
        """The anchor head's class probabilities ``[B, K, ...]`` from a :meth:`condition` (None without it)."""
        return None if self.anchor is None else (cond[-1].float() + 1) / 2

    def training_condition(self, image: torch.Tensor, x0: torch.Tensor) -> list[torch.Tensor]:
        """As :meth:`condition`; with the anchor head, keeps its logits and the mask for :meth:`extra_loss`."""
        cond, logits = self._condition(image)
        if logits is not None:
            self._anchor_logits, self._x0 = logits, x0
        return cond

    def extra_loss(self) -> torch.Tensor | None:
        """``anchor_weight * (Dice + CE)`` of the anchor head on the last training batch (then cleared);
        ``None`` without the anchor head."""
        logits, x0 = self._anchor_logits, self._x0
        self._anchor_logits = self._x0 = None
        return None if logits is None else self.anchor_weight * dice_ce(logits, x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        return self.mask_path(x_t, t, cond)

    def mask_path(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: list[torch.Tensor],
        first_level: Callable[[torch.Tensor], torch.Tensor] | None = None,
        bottleneck: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The per-step mask path on a :meth:`condition`. Variants add their conditioning through two
        optional hooks (MedSegDiff-V2): ``first_level(h)`` on the mask features of the first level after
        fusion, ``bottleneck(h)`` on the deepest mask features before the middle block. Without them this is MedSegDiff's denoiser."""
        temb = self.temb(t)
        if self.anchor is not None:
            *cond, anchor = cond
            x_t = torch.cat([x_t, anchor], dim=1)
        h = self.inp(x_t)
        skips = []
        for i, m_i in enumerate(cond[1:]):
            if i > 0:
                h = self.down[i - 1](h)
            h = self.film[i](self.fuse[i](self.ff[i](h), m_i), temb)
            if i == 0 and first_level is not None:
                h = first_level(h)
            skips.append(h)
        if bottleneck is not None:
            h = bottleneck(h)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h, size=skips[i].shape[2:], mode="nearest")
            h = self.up[i](torch.cat([h, skips[i]], dim=1))
        return self.out(torch.cat([resize(h, x_t.shape[2:]), cond[0], x_t], dim=1))
