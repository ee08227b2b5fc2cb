"""Noise schedule helpers shared by the training objective and the sampler (MONAI schedulers)."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from ..config import SegDiffConfig


def ddpm_scheduler(cfg: SegDiffConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def ddim_scheduler(cfg: SegDiffConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        set_alpha_to_one=True,
    )


def _alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t].float()
    return a.reshape(-1, *([1] * (ndim - 1)))


def predicted_x0(
    prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 implied by a network prediction of ``prediction_type`` (Ho et al. 2020; Salimans & Ho 2022)."""
    if prediction_type == "sample":
        return prediction
    ab = _alpha_bar(alphas_cumprod, t, x_t.ndim)
    if prediction_type == "epsilon":
        return (x_t - (1 - ab).sqrt() * prediction) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * prediction  # v_prediction


def x0_to_probs(x0: torch.Tensor, dim: int = 1, sharpness: float = 5.0) -> torch.Tensor:
    """Map a mask estimate in [-1, 1] (one-hot scaled) to class probabilities along ``dim``:
    ``softmax(sharpness * x0)``. A confident member (x0 = +-1) gets p ~ 1 - 1e-4, an undecided one
    (x0 ~ 0) a uniform vector, so the entropy of the ensemble mean is near zero where members agree
    (a linear map, (x0 + 1) / 2, left p ~ 0.7 everywhere and the entropy map flat)."""
    return torch.softmax(x0.float().clamp(-1, 1) * sharpness, dim=dim)
