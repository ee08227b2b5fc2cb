"""Samplers: few-step DDIM (default) and full DDPM, N ensemble members run as one batch.

The image path runs once per image batch (``net.condition``) and is reused by every step and every
member; only ``net.forward(x_t, t, cond)`` runs per step. A network may define
``member_condition(cond, n, generator) -> cond`` to expand the condition to ``n`` members itself
(member-major, like :func:`repeat_members`, which is used otherwise), e.g. to draw a per-member
latent that stays fixed over that member's steps (CIMD). A network with a deterministic head on
its image path may define ``anchor_probabilities(cond) -> [B, K, ...] | None`` (MedSegDiff's anchor),
which :meth:`DiffusionSampler.members_and_anchor` returns next to the members. The sampler knows
nothing else of the network (diffusers-style separation of model, scheduler and loop).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..config import SegDiffConfig
from .schedule import ddim_scheduler, ddpm_scheduler, x0_to_probs

METHODS = ("ddim", "ddpm")


def repeat_members(cond: object, n: int) -> object:
    """Repeat every tensor of a (possibly nested) condition ``n`` times along the batch axis,
    member-major: ``[m0 b0..bB, m1 b0..bB, ...]``."""
    return tree_map(lambda c: c.repeat(n, *([1] * (c.ndim - 1))) if isinstance(c, torch.Tensor) else c, cond)


def trailing_timesteps(train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced steps that start at the last training timestep ("trailing" spacing,
    Lin et al. 2024), so sampling starts from pure noise even with very few steps."""
    stride = train_timesteps / steps
    return [int(round(train_timesteps - i * stride)) - 1 for i in range(steps)]


def hold(probs: torch.Tensor | None, known: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """Probabilities ``[..., B, K, *spatial]`` with the ``known`` voxels (``(values [B, K, ...] in [-1, 1],
    mask [B, 1, ...])``) set to their known label."""
    if probs is None or known is None:
        return probs
    values, mask = known
    return torch.where(mask.to(probs.device, torch.bool), ((values.to(probs) + 1) / 2), probs)


class DiffusionSampler:
    """Draw ``num_samples`` masks per image.

    Args:
        cfg: diffusion settings of the checkpoint (schedule, prediction type).
        steps: DDIM steps (ignored for ``ddpm``, which runs all ``train_timesteps``).
        eta: DDIM eta; 0 makes each member deterministic given its initial noise.
        method: ``ddim`` or ``ddpm``.
    """

    def __init__(self, cfg: SegDiffConfig, steps: int | None = None, eta: float | None = None, method: str = "ddim"):
        if method not in METHODS:
            raise ValueError(f"sampler method must be one of {', '.join(METHODS)}, got {method!r}")
        steps = cfg.sample_steps if steps is None else int(steps)
        if not 1 <= steps <= cfg.train_timesteps:
            raise ValueError(f"steps must be in 1..{cfg.train_timesteps}, got {steps}")
        self.cfg, self.method, self.steps = cfg, method, steps
        self.eta = cfg.eta if eta is None else float(eta)
        if method == "ddim":
            self.scheduler = ddim_scheduler(cfg)
            self.scheduler.set_timesteps(steps)
            # MONAI's DDIM uses leading spacing; replace it by trailing spacing. ``step`` derives the
            # previous timestep from the same stride, so the last step lands on t = -1 (alpha_bar = 1)
            self.scheduler.timesteps = torch.tensor(trailing_timesteps(cfg.train_timesteps, steps), dtype=torch.long)
        else:
            self.scheduler = ddpm_scheduler(cfg)
            self.scheduler.set_timesteps(cfg.train_timesteps)

    @property
    def num_evaluations(self) -> int:
        return len(self.scheduler.timesteps)

    @torch.inference_mode()
    def sample(
        self,
        net: nn.Module,
        image: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return x0 estimates ``[N, B, K, *spatial]`` in [-1, 1] for ``image [B, C, *spatial]``,
        starting from ``noise [N * B, K, *spatial]`` (member-major) or fresh noise from ``generator``.

        ``known = (values [B, K, *spatial] in [-1, 1], mask [B, 1, *spatial] bool)``: voxels the annotator
        fixed (clicks, corrected slices), held at every step as in RePaint (Lugmayr et al., 2022, "RePaint:
        inpainting using denoising diffusion probabilistic models"): after each step the held voxels of
        ``x_{t-1}`` are the known mask noised to ``t-1`` with the member's own initial noise (no extra
        random draw, so an empty mask gives exactly the unconditioned samples), and the returned x0 holds
        them exactly. Needs no retraining."""
        return self._sample(net, image, num_samples, generator, noise, known)[0]

    def _alpha_bar(self, t: int) -> float:
        """``alpha_bar_t`` of the training schedule; 1 before the first timestep (clean data)."""
        if t < 0:
            return float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))
        return float(self.scheduler.alphas_cumprod[t])

    def _sample(self, net: nn.Module, image: torch.Tensor, num_samples: int, generator: torch.Generator | None,
                noise: torch.Tensor | None = None, known: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`sample`, plus the anchor probabilities ``[B, K, ...]`` (or None) from the same condition."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        b = image.shape[0]
        cond = net.condition(image)
        anchor_fn = getattr(net, "anchor_probabilities", None)
        anchor = anchor_fn(cond) if callable(anchor_fn) else None
        member_condition = getattr(net, "member_condition", None)  # e.g. CIMD: one prior z per member
        if callable(member_condition):
            cond = member_condition(cond, num_samples, generator)
        else:
            cond = repeat_members(cond, num_samples)
        shape = (num_samples * b, self.cfg.num_classes, *image.shape[2:])
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = (torch.randn(shape, generator=generator, device="cpu") if noise is None else noise).to(image.device)
        x0 = x
        held = None
        if known is not None:  # the same known voxels for every member (member-major, as the noise)
            values, mask = known
            values = torch.cat([values.to(x)] * num_samples)
            mask = torch.cat([mask.to(image.device, torch.bool)] * num_samples).expand_as(x)
            held = (values, mask, x.clone())
        stride = self.scheduler.num_train_timesteps // self.scheduler.num_inference_steps
        for t in self.scheduler.timesteps.tolist():
            tt = torch.full((shape[0],), t, device=image.device, dtype=torch.long)
            out = net(x, tt, cond)
            if self.method == "ddim":
                x, x0 = self.scheduler.step(out, t, x, eta=self.eta, generator=generator)
            else:
                x, x0 = self.scheduler.step(out, t, x, generator=generator)
            if held is not None:
                values, mask, x_t0 = held
                a = self._alpha_bar(t - stride)
                x = torch.where(mask, a**0.5 * values + (1 - a) ** 0.5 * x_t0, x)
                x0 = torch.where(mask, values, x0)
        return x0.clamp(-1, 1).reshape(num_samples, b, *shape[1:]), anchor

    def probabilities(
        self, net: nn.Module, image: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-member class probabilities ``[N, B, K, *spatial]`` (from ``noise`` if given)."""
        return x0_to_probs(self.sample(net, image, num_samples, generator, noise=noise), dim=2)

    @torch.inference_mode()
    def members_and_anchor(
        self, net: nn.Module, image: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None, noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(member probabilities [N, B, K, ...], the network's anchor probabilities [B, K, ...] or
        None)`` from one run of the image path, starting from ``noise`` if given; ``known`` voxels held as
        in :meth:`sample` (the anchor too: there it is the known label)."""
        x0, anchor = self._sample(net, image, num_samples, generator, noise=noise, known=known)
        return hold(x0_to_probs(x0, dim=2), known), hold(anchor, known)


class MCDropoutSampler:
    """Monte-Carlo dropout on a deterministic network: N stochastic passes run as one batch."""

    def __init__(self, cfg: SegDiffConfig):
        self.cfg = cfg

    @torch.inference_mode()
    def probabilities(
        self, net: nn.Module, image: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """N passes with dropout on (``noise`` is not used: there is no sampling)."""
        if generator is not None:  # dropout draws from the global generator
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        was_training = net.training
        net.eval()
        for m in net.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)) and num_samples > 1:
                m.train()
        logits = net(image.repeat(num_samples, *([1] * (image.ndim - 1))))
        net.train(was_training)
        return torch.softmax(logits.float(), dim=1).reshape(num_samples, image.shape[0], *logits.shape[1:])

    def members_and_anchor(
        self, net: nn.Module, image: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None, noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """As :meth:`DiffusionSampler.members_and_anchor`; a plain network has no anchor. ``known`` voxels
        get the known label in every pass (a deterministic network has no sampling to condition)."""
        return hold(self.probabilities(net, image, num_samples, generator), known), None


def build_sampler(cfg: SegDiffConfig, steps: int | None = None, eta: float | None = None, method: str = "ddim"):
    """The sampler matching ``cfg.network`` (MC-dropout for the baseline UNet)."""
    return DiffusionSampler(cfg, steps, eta, method) if cfg.is_diffusion else MCDropoutSampler(cfg)
