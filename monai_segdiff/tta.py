"""Test-time flips: each ensemble member is the mean of the network's answers on mirrored copies.

The members function of :class:`~monai_segdiff.diffusion.inferer.SegDiffInferer` is wrapped: the
image batch is flipped along a set of spatial axes, sampled with fresh noise, flipped back, and the
views are averaged member by member (and the anchor, if any). The ensemble keeps its size, so the
uncertainty maps keep their meaning; its cost grows with the number of views. Two views (with the
clean-up's mean gate at 0.45) raised the sample model's mean Dice on 420 fresh phantoms from 0.811 to
0.820 (BENCHMARKS.md, "Session 11").

MONAI's ``TestTimeAugmentation`` inverts random transforms of whole images through the data
pipeline; here the flips act on the batches of slices or patches inside the sliding inference,
where an exact inverse is one ``torch.flip``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from .config import check_tta_flips

Members = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def flip_views(spatial_dims: int, count: int) -> list[tuple[int, ...]]:
    """The first ``count`` of the ``2 ** spatial_dims`` mirror views, as axes counted from the end of
    a ``[B, C, *spatial]`` batch: the identity, then single axes (in-plane first), then pairs, ..."""
    check_tta_flips(spatial_dims, count)  # the rule lives with the config's options
    axes = [-spatial_dims + i for i in range(spatial_dims)]  # 2D: (-2, -1); 3D: (-3, -2, -1)
    views = [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]
    return views[:count]


def with_flips(members: Members, views: list[tuple[int, ...]]) -> Members:
    """``members(net, batch, n, generator)`` averaged over the mirror ``views`` (identity: unchanged)."""
    if len(views) <= 1 and not (views and views[0]):
        return members

    def flipped(net, batch: torch.Tensor, n: int, generator: torch.Generator | None, noise=None):
        total, anchor_total = None, None
        for i, dims in enumerate(views):
            # the first view starts from the given noise; the others draw theirs from the generator
            given = {"noise": noise} if (noise is not None and i == 0) else {}
            p, anchor = members(net, batch.flip(dims) if dims else batch, n, generator, **given)
            p = p.flip(dims) if dims else p  # [N, B, K, *spatial]: the same trailing axes
            total = p if total is None else total + p
            if anchor is not None:
                anchor = anchor.flip(dims) if dims else anchor
                anchor_total = anchor if anchor_total is None else anchor_total + anchor
        return total / len(views), (None if anchor_total is None else anchor_total / len(views))

    return flipped
