"""Losses used by the seed-paper variants.

- :class:`BoundaryWeights`: DermoSegDiff's boundary-aware weighting of the denoising loss
  (Bozorgpour et al., "DermoSegDiff: A Boundary-aware Segmentation Diffusion Model for Skin Lesion
  Delineation", PRIME/MICCAI workshop 2023), usable with any network through
  ``DiffusionObjective(weight_fn=...)``.
- :func:`diagonal_gaussian_kl`: KL divergence between axis-aligned Gaussians (CIMD's prior/posterior).
- :func:`dice_ce`: Dice + cross-entropy of logits against a one-hot mask scaled to [-1, 1] (anchor head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms.utils import distance_transform_edt


class BoundaryWeights:
    """Per-voxel weights ``1 + lam * W ** p(t)`` for the squared error of the denoising loss, so that
    ``mean(weights * err) = L2 + lam * L_boundary`` (DermoSegDiff, total loss with lambda = 0.25).

    ``W = 1 - d / max(d)`` where ``d`` is the Euclidean distance (voxels) to the nearest ground-truth
    boundary voxel (any voxel with a different label in its 3x3(x3) neighbourhood, so multi-class
    masks work), i.e. 1 on the boundary, 0 at the voxel farthest from it. The exponent
    ``p(t) = (gamma * (T - t) / T) ** gamma`` shrinks from ``gamma ** gamma`` at ``t = 0`` to 0 at
    ``t = T``: the weights focus on the boundary for nearly clean masks and are flat for pure noise.
    A sample whose foreground has fewer than ``min_foreground`` voxels (or no boundary) gets ``W = 1``
    (uniform weights). Masks larger than ``max_voxels`` per sample (3D patches) get the distance
    on a grid coarsened by an integer factor, interpolated back, with ``W = 1`` kept exactly on the
    boundary (weights within 0.02 of the exact ones; 1.2 s instead of 2.6 s for 16 patches of 96^3
    on one core; 2D slices of 96^2 take ~10 ms per batch of 16, exact).

    Args:
        timesteps: training timesteps ``T``.
        lam: weight ``lambda`` of the boundary term.
        gamma: ``gamma`` of the exponent schedule (the paper uses about 0.2-0.25).
        min_foreground: foreground voxels below which the weights are uniform.
        max_voxels: voxels per sample above which the distance is computed on a coarser grid.
    """

    def __init__(
        self, timesteps: int, lam: float = 0.25, gamma: float = 0.22, min_foreground: int = 16, max_voxels: int = 2**16
    ) -> None:
        if timesteps < 1 or gamma <= 0 or lam < 0:
            raise ValueError("BoundaryWeights needs timesteps >= 1, gamma > 0 and lam >= 0")
        self.timesteps, self.lam, self.gamma, self.min_foreground = int(timesteps), float(lam), float(gamma), int(min_foreground)
        self.max_voxels = int(max_voxels)

    def exponent(self, t: torch.Tensor) -> torch.Tensor:
        """``p(t) = (gamma * (T - t) / T) ** gamma``, per sample."""
        frac = (self.timesteps - t.float()).clamp(min=0) / self.timesteps
        return (self.gamma * frac) ** self.gamma

    @torch.no_grad()
    def boundary_map(self, x0: torch.Tensor) -> torch.Tensor:
        """``W [B, 1, ...]`` in [0, 1] from a one-hot mask scaled to [-1, 1] ``[B, K, ...]``."""
        labels = x0.argmax(1).to(torch.int16)  # [B, ...]
        boundary = _neighbourhood(labels, torch.maximum) != _neighbourhood(labels, torch.minimum)
        spatial = boundary.shape[1:]
        factor = math.ceil((math.prod(spatial) / self.max_voxels) ** (1 / len(spatial)))
        coarse = boundary
        if factor > 1:  # a coarse voxel is on the boundary if any of its voxels is
            pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
            coarse = pool(boundary[:, None].float(), factor, stride=factor, ceil_mode=True)[:, 0] > 0
        dist = torch.as_tensor(distance_transform_edt((~coarse).cpu())).to(x0.device).float()
        dmax = dist.flatten(1).amax(1).clamp_min(1e-6).reshape(-1, *([1] * (dist.ndim - 1)))
        w = 1 - dist / dmax
        if factor > 1:
            mode = "bilinear" if len(spatial) == 2 else "trilinear"
            w = F.interpolate(w[:, None], size=spatial, mode=mode, align_corners=False)[:, 0].clamp(0, 1)
            w[boundary] = 1.0
        tiny = ((labels > 0).flatten(1).sum(1) < self.min_foreground) | ~boundary.flatten(1).any(1)
        w[tiny] = 1.0
        return w[:, None]

    def __call__(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.boundary_map(x0)
        p = self.exponent(t).to(w.device).reshape(-1, *([1] * (w.ndim - 1)))
        return 1 + self.lam * w.pow(p)


def _neighbourhood(v: torch.Tensor, op) -> torch.Tensor:
    """Maximum or minimum (``op``) over the 3x3(x3) neighbourhood of every voxel of ``v [B, ...]``,
    edges replicated; separable, with shifted views (CPU 3x3x3 max pooling of the one-hot mask took
    ~5 s for 16 x 3 x 96^3 on one core, and dominated the whole weighting)."""
    for ax in range(1, v.ndim):
        n = v.shape[ax]
        if n > 1:
            before = torch.cat([v.narrow(ax, 0, 1), v.narrow(ax, 0, n - 1)], ax)
            after = torch.cat([v.narrow(ax, 1, n - 1), v.narrow(ax, n - 1, 1)], ax)
            v = op(op(v, before), after)
    return v


def diagonal_gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu_q, var_q) || N(mu_p, var_p))`` summed over the last axis, per sample."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


_DICE_CE = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)


def dice_ce(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Dice (foreground classes) + cross-entropy of ``logits [B, K, ...]`` against the mask ``x0``
    (one-hot scaled to [-1, 1])."""
    return _DICE_CE(logits.float(), x0.argmax(1, keepdim=True))
