"""MedSegDiff-V2 (Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with
Transformer", AAAI 2024, arXiv 2301.11798): MedSegDiff (:mod:`.medsegdiff`) plus two conditions from
the image path ("condition model") on the noisy-mask path ("diffusion model"):

- **Anchor condition with uncertain spatial attention (U-SA)**, paper section "Anchor Condition": the
  anchor (the image path's coarse prediction, supervised with Dice + CE) is smoothed by a Gaussian
  kernel of learnable width and kept where it is larger than the smoothing,
  ``f*_anc = max(f_anc * k_Gauss, f_anc)``, so uncertain borders get wider support; it then gates the
  first encoder level of the mask path, ``f' = sigmoid(f*_anc * k_conv + f_d) . f_d``.
- **Semantic condition with the Spectrum-Space Transformer (SS-Former)**, paper section "Semantic
  Condition": cross-attention from the deepest noisy-mask features to the deepest image features,
  each block with a learnable filter of the features' spectrum (the paper's neural band-pass filter,
  NBP-Filter) in front of the attention.

Where the paper leaves a choice open, this implementation takes the following (see also the
arguments):

- The Gaussian is separable with one learnable ``sigma`` (voxels of the anchor's grid, clamped to
  ``[0, usa_radius]``), applied to the anchor's class probabilities of every class (background
  included: at a border both the background and the foreground are then high, which is what marks it
  uncertain), on the full-resolution anchor once per image in ``condition``. It is computed as a
  weighted sum of shifted copies, so ``sigma = 0`` gives the one-hot kernel and
  ``max(p * k, p) = p`` exactly: U-SA with no smoothing is MedSegDiff's plain anchor condition.
- The smoothed anchor replaces the plain one wherever MedSegDiff feeds the anchor to the mask path
  (next to ``x_t`` at its input and in its output head) and drives the gate of the first mask-path
  level (half resolution). The gate adds back its input, ``f' = f_d + sigmoid(.) . f_d``, so the
  untrained gate does not halve the features; ``k_conv`` is a 3x3(x3) convolution, computed in
  ``condition`` (it does not depend on ``x_t``). The fusion of the anchor into the ensemble
  (``anchor_probabilities``) keeps the plain, unsmoothed probabilities.
- SS-Former runs at the bottleneck only (the lowest resolution of the mask path), on a width of its
  own (``ss_channels``); its keys and values are the deepest image-path features projected to that
  width in ``condition``. A block is: the FF-Parser of MedSegDiff on the query features (the
  NBP-Filter's role: a learnable complex filter of the spectrum, identity at initialisation), then
  MONAI's ``TransformerBlock`` with cross-attention (self-attention, cross-attention to the image
  tokens, MLP, each pre-norm and residual). The paper alternates the direction of the
  cross-attention between blocks; here the noisy-mask features always query, so the image tokens
  are computed once per image. No positional embedding: the queries are convolution features that
  carry their position.
- The paper's condition model is a transformer (TransUNet-like) and its diffusion model a full UNet;
  here both are MedSegDiff's (a small UNet image path run once per image, a light per-step mask
  path), so only the two conditioning mechanisms differ from MedSegDiff with its anchor head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.layers import Conv
from torch import nn

from .blocks import pointwise, resize, two_path_widths
from .medsegdiff import FFParser, MedSegDiff


class UncertainSpatialAttention(nn.Module):
    """U-SA: a learnable Gaussian smoothing of the anchor, ``max(p * k_Gauss, p)``, and a spatial
    gate ``f + sigmoid(conv(anchor) + f) * f`` of mask-path features ``f``.

    Args:
        spatial_dims: 2 or 3.
        num_classes: channels of the anchor (class probabilities).
        channels: channels of the gated mask-path features.
        radius: half-width of the Gaussian kernel in voxels (``2 * radius + 1`` taps per axis); also
            the largest ``sigma``.
        sigma: initial standard deviation of the Gaussian in voxels (learned; 0 = no smoothing).
    """

    def __init__(self, spatial_dims: int, num_classes: int, channels: int, radius: int = 3, sigma: float = 1.0) -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        self.radius = int(radius)
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        self.conv = Conv[Conv.CONV, spatial_dims](num_classes, channels, kernel_size=3, padding=1)

    def kernel(self) -> torch.Tensor:
        """The normalised 1D Gaussian taps ``[2 * radius + 1]``; exactly one-hot when ``sigma`` is 0."""
        sigma = self.sigma.clamp(0.0, float(self.radius))
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32, device=sigma.device)
        k = torch.exp(-(x**2) / (2 * sigma.float() ** 2 + 1e-12))  # sigma 0: exp(-x^2 * 1e12) = 0 off-centre
        return k / k.sum()

    def smooth(self, p: torch.Tensor) -> torch.Tensor:
        """``max(p * k_Gauss, p)`` of probabilities ``p [B, K, *spatial]``, separable, replicate padding."""
        k = self.kernel().to(p.dtype)
        r = self.radius
        out = p
        for axis in range(2, p.ndim):
            pad = [0, 0] * (p.ndim - 2)
            pad[2 * (p.ndim - 1 - axis)] = pad[2 * (p.ndim - 1 - axis) + 1] = r  # F.pad lists the last axis first
            padded = F.pad(out, pad, mode="replicate")
            n = out.shape[axis]
            out = sum(k[j] * padded.narrow(axis, j, n) for j in range(2 * r + 1))
        return torch.maximum(out, p)

    def attention_logits(self, anchor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``f*_anc * k_conv`` on the grid ``size`` of the gated features (image-only: once per image)."""
        return self.conv(resize(anchor, size))

    def forward(self, f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Gate the mask-path features ``f`` with :meth:`attention_logits`."""
        return f + torch.sigmoid(logits + f) * f


class SpectrumSpaceTransformer(nn.Module):
    """SS-Former: noisy-mask features attend to image tokens, each block behind a learnable filter of
    the features' spectrum (the FF-Parser, in the role of MedSegDiff-V2's NBP-Filter).

    Args:
        spatial_dims: 2 or 3.
        channels: channels of the mask-path features (in and out, added back as a residual).
        context_channels: channels of the image features the tokens are made from.
        hidden: width of the transformer.
        heads: attention heads (``hidden`` must divide by it).
        blocks: number of (filter, transformer block) pairs.
        ff_size: stored size of each filter's weight map (see ``FFParser``).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        context_channels: int,
        hidden: int = 32,
        heads: int = 2,
        blocks: int = 2,
        ff_size: int = 16,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"ss_channels ({hidden}) must be divisible by ss_heads ({heads})")
        self.inp = pointwise(spatial_dims, channels, hidden)
        self.context = pointwise(spatial_dims, context_channels, hidden)
        self.filters = nn.ModuleList(FFParser(spatial_dims, hidden, ff_size) for _ in range(blocks))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden, hidden * 2, heads, with_cross_attention=True) for _ in range(blocks)
        )
        self.out = pointwise(spatial_dims, hidden, channels)

    def tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        """Keys and values of the cross-attention ``[B, N, hidden]`` from image features (once per image)."""
        return self.context(image_features).flatten(2).transpose(1, 2)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(h)
        shape = x.shape
        for spectral, block in zip(self.filters, self.blocks):
            q = spectral(x).flatten(2).transpose(1, 2)
            x = block(q, context=tokens).transpose(1, 2).reshape(shape)
        return h + self.out(x)


class MedSegDiffV2(MedSegDiff):
    """MedSegDiff with U-SA (anchor condition) and SS-Former (semantic condition); see the module
    docstring for the paper and the choices made where it is open. Same interface as
    :class:`MedSegDiff`: ``condition(image)`` once per image, ``forward(x_t, t, cond)`` per step, and
    with the anchor head ``training_condition`` / ``extra_loss`` / ``anchor_probabilities``.

    Args:
        spatial_dims: 2 or 3.
        image_channels: input image channels (2.5D context included).
        num_classes: mask channels (one-hot, background included).
        channels: image-path channels per level.
        mask_channels: mask-path channels per level (default: a quarter of ``channels``, >= 8).
        norm_num_groups: group-norm groups of the image path.
        anchor: the anchor head and U-SA (on by default: the anchor condition is half of V2); off leaves
            SS-Former only.
        usa_radius: half-width in voxels of U-SA's Gaussian kernel (and the largest sigma).
        usa_sigma: initial sigma of U-SA's Gaussian in voxels (learned; 0 = the plain anchor).
        ss_channels: width of SS-Former.
        ss_heads: SS-Former's attention heads.
        ss_blocks: SS-Former's blocks (>= 1).
        ff_size: stored size of the spectral filters' weight maps (mask path and SS-Former).
        kwargs: the other arguments of :class:`MedSegDiff` (``ff_parser``, ``anchor_weight``,
            ``image_stride``).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        mask_channels: Sequence[int] | None = None,
        norm_num_groups: int = 8,
        anchor: bool = True,
        usa_radius: int = 3,
        usa_sigma: float = 1.0,
        ss_channels: int = 32,
        ss_heads: int = 2,
        ss_blocks: int = 2,
        ff_size: int = 16,
        **kwargs,
    ) -> None:
        super().__init__(
            spatial_dims, image_channels, num_classes, channels=channels, mask_channels=mask_channels,
            norm_num_groups=norm_num_groups, ff_size=ff_size, anchor=anchor, **kwargs,
        )
        if ss_blocks < 1:
            raise ValueError(f"ss_blocks must be >= 1, got {ss_blocks}")
        mch = two_path_widths(channels, mask_channels, norm_num_groups)[1]
        levels = mch[1:] if self.image_stride == 1 else mch  # as in MedSegDiff: the mask path's levels
        self.usa = UncertainSpatialAttention(spatial_dims, num_classes, levels[0], usa_radius, usa_sigma) if anchor else None
        self.ss_former = SpectrumSpaceTransformer(
            spatial_dims, levels[-1], list(channels)[-1], ss_channels, ss_heads, ss_blocks, ff_size
        )

    def _condition(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """MedSegDiff's condition with the smoothed anchor in place of the plain one, then U-SA's gate
        logits, SS-Former's image tokens, and the plain anchor last (for ``anchor_probabilities``)."""
        feats = self.image_path(image)
        cond, logits = self._condition_from(feats, image)
        tokens = self.ss_former.tokens(feats[-1])
        if self.usa is None:
            return cond + [tokens], logits
        *cond, plain = cond
        smoothed = 2 * self.usa.smooth((plain.float() + 1) / 2).to(plain.dtype) - 1
        level0 = cond[1].shape[2:]  # the grid of the first mask-path level
        return cond + [smoothed, self.usa.attention_logits(smoothed, level0), tokens, plain], logits

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        gate = None
        if self.usa is None:
            *cond, tokens = cond
        else:
            *cond, smoothed, gate, tokens, _plain = cond
            cond = cond + [smoothed]
        return self.mask_path(
            x_t, t, cond,
            first_level=None if gate is None else (lambda h: self.usa(h, gate)),
            bottleneck=lambda h: self.ss_former(h, tokens),
        )
