"""Volume inferer: slices (2D / 2.5D) or sliding-window patches (3D) in bounded batches, ensemble of
N members, returning the fused class probabilities, the N member label maps and the mean member
entropy. Fused = the members' mean, or, with a deterministic anchor prediction and ``anchor_share``
s > 0, the mixture ``(1 - s) * members' mean + s * anchor`` (its expected entropy weighted alike)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from torch import nn
from tqdm import tqdm

# ``(net, image_batch [B, C, ...], num_samples, generator[, noise=]) -> member probabilities [N, B, K, ...]``,
# or ``(member probabilities, anchor probabilities [B, K, ...] or None)``; a function that takes ``noise``
# gets each slice's own initial noise in slice mode (see ``SegDiffInferer._slice_noise``)
MemberFn = Callable[[nn.Module, torch.Tensor, int, "torch.Generator | None"], "torch.Tensor | tuple"]


@dataclass
class EnsembleOutput:
    """What one volume yields; spatial grid = the inferer's input grid."""

    probs: torch.Tensor  # [K, *spatial] float32, fused: mean over members (and the anchor's share)
    samples: torch.Tensor  # [N, *spatial] uint8 class index per member
    expected_entropy: torch.Tensor  # [*spatial] float32, mean member entropy (nats), weighted as probs


def context_slices(volume: torch.Tensor, context: int) -> torch.Tensor:
    """``[C, H, W, D] -> [D, C * (2 * context + 1), H, W]``: each slice with its neighbours as
    channels (2.5D); edge slices repeat the border slice."""
    c, h, w, d = volume.shape
    idx = torch.arange(d)[:, None] + torch.arange(-context, context + 1)[None, :]
    idx = idx.clamp(0, d - 1)  # [D, 2c+1]
    stacked = volume.permute(3, 0, 1, 2)[idx]  # [D, 2c+1, C, H, W]
    return stacked.permute(0, 2, 1, 3, 4).reshape(d, c * (2 * context + 1), h, w)


def pad_to_multiple(x: torch.Tensor, divisor: int, spatial_dims: int, value: float = -1.0):
    """Pad the last ``spatial_dims`` axes up to a multiple of ``divisor``; returns (padded, crop slices)."""
    sizes = x.shape[-spatial_dims:]
    pads, crop = [], []
    for s in reversed(sizes):
        total = (-s) % divisor
        pads += [total // 2, total - total // 2]
    for s, (lo, _hi) in zip(sizes, zip(pads[::2][::-1], pads[1::2][::-1])):
        crop.append(slice(lo, lo + s))
    return F.pad(x, pads, value=value), tuple(crop)


def class_argmax(x: torch.Tensor, dim: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``x.argmax(dim)`` for a short class axis (first maximum on ties, as ``torch.argmax``), as ``dtype``.

    A running comparison over the K classes: ``torch.argmax`` over a non-innermost axis of a volume is a
    strided reduction, about 1 s for 3 x 261 x 261 x 180 on this CPU; this takes a tenth of that.
    NaN is never the maximum here (probabilities have none)."""
    k = x.shape[dim]
    if k > 16 or k < 2:
        return x.argmax(dim).to(dtype)
    best = x.select(dim, 0)
    index = torch.zeros(best.shape, dtype=dtype)
    for c in range(1, k):
        value = x.select(dim, c)
        better = value > best
        best = torch.maximum(best, value)
        index.masked_fill_(better, c)
    return index


def entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy in nats over the class axis ``dim`` of probabilities (0 log 0 = 0), float32,
    accumulated one class at a time (no ``K``-fold temporary of a volume)."""
    out = torch.zeros(p.select(dim, 0).shape, dtype=torch.float32)
    for c in range(p.shape[dim]):
        q = p.select(dim, c).float()
        out -= torch.special.xlogy(q, q)
    return out.clamp_(min=0.0)


def _fuse(
    members: torch.Tensor, anchor: torch.Tensor | None, share: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fused probabilities, expected entropy)`` of members ``[N, ...]`` (classes on ``dim`` of a
    member) and an optional anchor ``[...]`` holding ``share`` of the mixture."""
    probs, ent = members.mean(0), entropy(members, dim + 1).mean(0)
    if anchor is None:
        return probs, ent
    return (1 - share) * probs + share * anchor, (1 - share) * ent + share * entropy(anchor, dim)


def _split(out: "torch.Tensor | tuple", share: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A member function's result as ``(members, anchor or None)``; no anchor when its share is 0."""
    members, anchor = out if isinstance(out, tuple) else (out, None)
    return members, (anchor if share > 0 else None)


def _contiguous(zs: Sequence[int]) -> list[list[int]]:
    """Sorted indices split into runs of consecutive values."""
    runs: list[list[int]] = []
    for z in zs:
        if runs and z == runs[-1][-1] + 1:
            runs[-1].append(z)
        else:
            runs.append([z])
    return runs


class SegDiffInferer(Inferer):
    """Run an ensemble predictor over a whole preprocessed volume.

    Args:
        members: function returning member probabilities for an image batch (a sampler's
            ``probabilities``), or them and an anchor prediction (``members_and_anchor``).
        num_samples: ensemble size N.
        num_classes: K, background included.
        spatial_dims: 2 = slice mode along the last axis, 3 = sliding-window patches.
        context: neighbouring slices per side as extra channels (2D only).
        divisor: network size divisor (slices are padded to a multiple).
        max_batch_pixels: bound on voxels per network call (members x slices x pixels), which
            bounds memory for CT-sized volumes.
        roi_size: 3D patch size; overlap: sliding-window overlap (3D only).
        seed: seed of the initial noise, so a run is reproducible.
        progress: show a progress bar.
        anchor_share: share of the anchor prediction in the fused probabilities (0: members only).
    """

    def __init__(
        self,
        members: MemberFn,
        num_samples: int,
        num_classes: int,
        spatial_dims: int = 2,
        context: int = 0,
        divisor: int = 4,
        max_batch_pixels: int = 2**20,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.25,
        seed: int | None = 0,
        progress: bool = False,
        anchor_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.members, self.n, self.k = members, int(num_samples), int(num_classes)
        self.spatial_dims, self.context, self.divisor = spatial_dims, context, divisor
        self.max_batch_pixels, self.roi_size, self.overlap = max_batch_pixels, roi_size, overlap
        self.seed, self.progress, self.anchor_share = seed, progress, float(anchor_share)
        try:
            self.takes_noise = "noise" in inspect.signature(members).parameters
        except (TypeError, ValueError):
            self.takes_noise = False

    def _generator(self, offset: int = 0) -> torch.Generator | None:
        """The generator of the batch starting at slice ``offset`` (``seed`` itself for the first)."""
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed) + 100_003 * int(offset))

    @torch.inference_mode()
    def __call__(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args,
        side: torch.Tensor | None = None,
        only: Sequence[int] | None = None,
        previous: EnsembleOutput | None = None,
        **kwargs,
    ) -> EnsembleOutput:
        """``inputs [C, *spatial]`` (one preprocessed volume, or one 2D image).

        ``side [E, *spatial]``: per-voxel channels appended to every batch after the image channels (with
        their 2.5D context) and cut like them, never context-stacked (click guidance, held voxels: the
        members function splits them off). ``only`` + ``previous`` (slice mode): compute only the batches
        holding these slices, take every other slice from ``previous`` (an earlier result of the same
        volume, seed and settings)."""
        x = torch.as_tensor(inputs).float()
        side = None if side is None else torch.as_tensor(side).float()
        if x.ndim - 1 == 2 and self.spatial_dims == 2:  # a 2D image: the network sees it whole
            out = self._slices(x[..., None], network, None if side is None else side[..., None])
            return EnsembleOutput(out.probs[..., 0], out.samples[..., 0], out.expected_entropy[..., 0])
        if self.spatial_dims == 2:
            return self._slices(x, network, side, only, previous)
        return self._patches(x, network, side)

    def _slices(self, volume: torch.Tensor, net: nn.Module, side: torch.Tensor | None = None,
                only: Sequence[int] | None = None, previous: EnsembleOutput | None = None) -> EnsembleOutput:
        c, h, w, d = volume.shape
        if only is not None and previous is not None:
            probs, samples = previous.probs.clone(), previous.samples.clone()
            exp_ent = previous.expected_entropy.clone()
            wanted = {int(z) for z in only}
        else:
            probs = torch.zeros(self.k, h, w, d)
            samples = torch.zeros(self.n, h, w, d, dtype=torch.uint8)
            exp_ent = torch.zeros(h, w, d)
            wanted = None
        per_batch = max(1, self.max_batch_pixels // (self.n * h * w))
        # the batches of a plain run; an update (``only``) computes the wanted slices of a batch from that
        # batch's generator and the rows of its initial noise that belong to them, so each recomputed slice
        # starts from the plain run's noise whichever slices are recomputed with it
        batches = [(b0, min(d, b0 + per_batch)) for b0 in range(0, d, per_batch)]
        if wanted is not None:
            batches = [(b0, b1) for b0, b1 in batches if wanted & set(range(b0, b1))]
        if self.progress:
            batches = tqdm(batches, desc="slices", unit="batch", leave=False)
        for b0, b1 in batches:
            gen = self._generator(b0)
            runs = [(b0, b1)] if wanted is None else [(r[0], r[-1] + 1) for r in _contiguous(sorted(wanted & set(range(b0, b1))))]
            noise = None
            if self.takes_noise and gen is not None:  # the draw the sampler makes in a plain run, made here
                padded = [s + (-s) % self.divisor for s in (h, w)]
                noise = torch.randn(self.n * (b1 - b0), self.k, *padded, generator=gen).view(self.n, b1 - b0, self.k, *padded)
            for z0, z1 in runs:
                self._slice_batch(volume, net, side, z0, z1, gen,
                                  None if noise is None else noise[:, z0 - b0 : z1 - b0].flatten(0, 1),
                                  probs, samples, exp_ent)
        return EnsembleOutput(probs, samples, exp_ent)

    def _slice_batch(self, volume: torch.Tensor, net: nn.Module, side: torch.Tensor | None, z0: int, z1: int,
                     gen: torch.Generator | None, noise: torch.Tensor | None, probs: torch.Tensor,
                     samples: torch.Tensor, exp_ent: torch.Tensor) -> None:
        """Slices ``z0..z1`` of a volume into ``probs``, ``samples``, ``exp_ent``."""
        d = volume.shape[-1]
        sub = volume[..., max(0, z0 - self.context) : min(d, z1 + self.context)]
        batch = context_slices(sub, self.context)[z0 - max(0, z0 - self.context) :][: z1 - z0]
        batch, crop = pad_to_multiple(batch, self.divisor, 2)
        if side is not None:  # padded with 0: no guidance, nothing held
            batch = torch.cat([batch, pad_to_multiple(side[..., z0:z1].permute(3, 0, 1, 2), self.divisor, 2, 0.0)[0]], 1)
        given = {"noise": noise} if noise is not None else {}
        p, anchor = _split(self.members(net, batch, self.n, gen, **given), self.anchor_share)
        p = p[..., crop[0], crop[1]]  # [N, B, K, h, w]
        anchor = None if anchor is None else anchor[..., crop[0], crop[1]]
        fused, ent = _fuse(p, anchor, self.anchor_share, 1)
        probs[..., z0:z1] = fused.permute(1, 2, 3, 0)
        samples[..., z0:z1] = class_argmax(p, 2, torch.uint8).permute(0, 2, 3, 1)
        exp_ent[..., z0:z1] = ent.permute(1, 2, 0)

    def _patches(self, volume: torch.Tensor, net: nn.Module, side: torch.Tensor | None = None) -> EnsembleOutput:
        gen = self._generator()
        roi = tuple(self.roi_size or [min(s, 64) for s in volume.shape[1:]])
        n, k = self.n, self.k

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            p, anchor = _split(self.members(net, patch, n, gen), self.anchor_share)  # [N, B, K, ...], [B, K, ...]
            p = p.transpose(0, 1).reshape(patch.shape[0], n * k, *patch.shape[2:])
            return p if anchor is None else torch.cat([p, anchor.to(p.dtype)], 1)

        padded, crop = pad_to_multiple(volume[None], self.divisor, 3)
        if side is not None:  # padded with 0: no guidance, nothing held
            padded = torch.cat([padded, pad_to_multiple(side[None], self.divisor, 3, 0.0)[0]], 1)
        roi = tuple(min(r, s) - (min(r, s) % self.divisor) for r, s in zip(roi, padded.shape[2:]))
        sw_batch = max(1, self.max_batch_pixels // (n * math.prod(roi)))
        out = sliding_window_inference(
            padded, roi, sw_batch, predictor, overlap=self.overlap, mode="gaussian", progress=self.progress
        )
        out = out[0][(slice(None), *crop)].reshape(-1, k, *volume.shape[1:])  # N (+ 1 anchor) x K
        out = out / out.sum(1, keepdim=True).clamp_min(1e-8)
        member_probs, anchor = out[:n], (out[n] if len(out) > n else None)
        fused, ent = _fuse(member_probs, anchor, self.anchor_share, 0)
        return EnsembleOutput(fused, class_argmax(member_probs, 1, torch.uint8), ent)
