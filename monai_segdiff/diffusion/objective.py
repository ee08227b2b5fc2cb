"""Training objective: denoising loss on a MONAI scheduler, target eps / x0 / v, optional Dice on x0."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..config import SegDiffConfig
from .schedule import ddpm_scheduler, predicted_x0

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionObjective:
    """``loss = MSE(prediction, target) + aux_dice_weight * Dice(x0_hat, mask)``.

    Args:
        cfg: model and diffusion settings.
        weight_fn: optional per-voxel weights ``(mask, t) -> [B, 1, ...]`` for the MSE term
            (e.g. the DermoSegDiff boundary-aware weights).
    """

    def __init__(self, cfg: SegDiffConfig, weight_fn: WeightFn | None = None) -> None:
        self.cfg = cfg
        self.scheduler = ddpm_scheduler(cfg)
        self.weight_fn = weight_fn
        self.dice = DiceLoss(include_background=False, reduction="mean")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction_type == "epsilon":
            return noise
        if self.cfg.prediction_type == "sample":
            return x0
        return self.scheduler.get_velocity(x0, noise, t)

    def __call__(
        self, net: nn.Module, image: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One training loss on a batch: ``image [B, C, ...]``, ``x0`` one-hot mask scaled to [-1, 1]."""
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.train_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        training_condition = getattr(net, "training_condition", None)  # e.g. CIMD's posterior z
        cond = training_condition(image, x0) if callable(training_condition) else net.condition(image)
        pred = net(x_t, t, cond)
        err = (pred.float() - self.target(x0, noise, t)) ** 2
        if self.weight_fn is not None:
            err = err * self.weight_fn(x0, t)
        mse = err.mean()
        logs = {"mse": float(mse.detach())}
        loss = mse
        if self.cfg.aux_dice_weight > 0:
            x0_hat = predicted_x0(pred, x_t, t, self.scheduler.alphas_cumprod, self.cfg.prediction_type)
            dice = self.dice(soft_mask(x0_hat), (x0 > 0).float())
            loss = loss + self.cfg.aux_dice_weight * dice
            logs["dice_loss"] = float(dice.detach())
        extra = getattr(net, "extra_loss", None)
        if callable(extra):  # e.g. CIMD's KL term or an anchor head's supervision, from training_condition
            aux = extra()
            if aux is not None:
                loss = loss + aux
                logs["extra"] = float(aux.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs


def soft_mask(x0_hat: torch.Tensor) -> torch.Tensor:
    """Linear map of an x0 estimate to per-class soft masks for the auxiliary Dice loss (gentler
    gradients than the sharpened probabilities used at inference)."""
    p = (x0_hat.float().clamp(-1, 1) + 1) / 2 + 1e-4
    return p / p.sum(dim=1, keepdim=True)


def supervised_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy for the deterministic baseline (``label`` holds class indices [B, 1, ...])."""
    ce = F.cross_entropy(logits, label[:, 0].long())
    dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False)(logits, label)
    return ce + dice
