"""The training loop shared by the CLI and the MONAI Label trainer: preprocess the labelled cases
once into memory, sample foreground-aware slices / patches, optimise the diffusion objective (or
Dice + CE for the baseline), validate with few-step samples, keep the best checkpoint."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import metrics
from .config import SegDiffConfig, load_checkpoint, save_checkpoint
from .diffusion.inferer import SegDiffInferer
from .diffusion.objective import DiffusionObjective, supervised_loss
from .diffusion.sampler import build_sampler
from .networks import build_network
from .transforms import InputError, PatchSampler, apply, preprocess_transforms, to_onehot_scaled


@dataclass
class TrainResult:
    """Summary of a run (plain types, JSON-serialisable)."""

    checkpoint: str | None
    epochs: int
    steps: int
    seconds: float
    best_dice: float
    best_epoch: int
    losses: list[float] = field(default_factory=list)
    val_dice: list[float] = field(default_factory=list)


def image_spacing(path: str) -> tuple[list[float], list[int]]:
    """Voxel spacing and size from the header only (SimpleITK reads no pixels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return list(reader.GetSpacing()), list(reader.GetSize())


def auto_spacing(items: Sequence[dict], spatial_dims: int = 2, max_size: int = 256) -> list[float]:
    """nnU-Net-like target spacing: the median spacing of the training images, coarsened where the
    median field of view would exceed ``max_size`` voxels. 2D mode keeps each slice's own spacing
    along the slice axis (-1)."""
    spacings, sizes = [], []
    for it in items:
        try:
            sp, sz = image_spacing(it["image"])
        except Exception:  # a format without a header reader: leave it to the data
            continue
        if len(sp) >= 3:
            spacings.append(sp[:3])
            sizes.append(sz[:3])
    if not spacings:
        return [-1.0, -1.0, -1.0]
    med = [statistics.median(s[i] for s in spacings) for i in range(3)]
    fov = [statistics.median(s[i] * z[i] for s, z in zip(spacings, sizes)) for i in range(3)]
    out = [round(max(m, f / max_size), 3) for m, f in zip(med, fov)]
    if spatial_dims == 2:
        out[2] = -1.0
    return out


def auto_roi(items: Sequence[dict], spatial_dims: int = 2, divisor: int = 8, largest: int = 96) -> list[int]:
    """Training patch size: the median image size (voxels), capped at ``largest`` and rounded up to
    a multiple of ``divisor``, so small images are not padded to a large patch."""
    sizes = []
    for it in items:
        try:
            sizes.append(image_spacing(it["image"])[1][:3])
        except Exception:  # unreadable header: the default below
            continue
    if not sizes:
        return [largest] * spatial_dims
    med = [statistics.median(s[i] for s in sizes) for i in range(spatial_dims)]
    return [int(math.ceil(min(m, largest) / divisor) * divisor) for m in med]


def new_config(
    items: Sequence[dict],
    labels: Sequence[str],
    network: str = "medsegdiff",
    spatial_dims: int = 2,
    channels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    **overrides,
) -> SegDiffConfig:
    """The config of a new model for ``items``: the library's default widths (MONAI's UNet family
    for the baseline), no attention, spacing and patch size chosen from the data."""
    from .segmenter import load_image

    channels = list(channels or ([16, 32, 64, 128] if network == "unet" else SegDiffConfig().channels))
    return SegDiffConfig(
        labels=list(labels), network=network, spatial_dims=spatial_dims,
        context=overrides.pop("context", 1) if spatial_dims == 2 else 0,
        channels=channels, attention_levels=[False] * len(channels),
        norm_num_groups=16 if all(c % 16 == 0 for c in channels) else 8,
        spacing=list(spacing or auto_spacing(items, spatial_dims)),
        roi_size=list(roi_size or auto_roi(items, spatial_dims, 2 ** (len(channels) - 1))),
        image_channels=int(load_image(items[0]["image"]).shape[0]),
        **overrides,
    )


def load_cases(
    items: Sequence[dict], cfg: SegDiffConfig, use_raters: bool = False, progress: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocess labelled cases once: ``[(image [C, ...], labels [R, ...] uint8)]``."""
    out = []
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="loading", unit="case", leave=False)
    for item in it:
        keys = ["label"] + ([f"rater{i}" for i in range(len(item.get("raters", [])))] if use_raters else [])
        data = {"image": item["image"], "label": item["label"]}
        if use_raters:
            data.update({f"rater{i}": p for i, p in enumerate(item.get("raters", []))})
        try:
            d = apply(preprocess_transforms(cfg, label_keys=keys), data)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot load case {item.get('id', item['image'])}: {str(e).splitlines()[0][:300]}") from e
        img = d["image"].as_tensor().float()
        if img.shape[0] != cfg.image_channels:
            raise InputError(f"{item['image']} has {img.shape[0]} channels, expected {cfg.image_channels}")
        if img.ndim == 3:  # 2D image: a one-slice volume
            img = img[..., None]
        labels = torch.cat([d[k].as_tensor() for k in keys]).to(torch.uint8)
        if labels.ndim == 3:
            labels = labels[..., None]
        out.append((img, labels))
    return out


def validation_dice(net: nn.Module, cfg: SegDiffConfig, cases, num_samples: int = 2, steps: int | None = None) -> float:
    """Mean foreground Dice of the fused few-step ensemble on preprocessed cases."""
    if not cases:
        return float("nan")
    sampler = build_sampler(cfg, steps=steps)
    inferer = SegDiffInferer(
        sampler.probabilities, num_samples, cfg.num_classes, cfg.spatial_dims, cfg.context, cfg.divisor,
        roi_size=cfg.roi_size if cfg.spatial_dims == 3 else None, seed=0,
    )
    net.eval()
    scores = []
    for img, labels in cases:
        pred = inferer(img, net).probs.argmax(0)
        scores.append(float(np.nanmean(metrics.dice_per_label(pred, labels[0].long(), cfg.num_classes))))
    return float(np.mean(scores))


def train(
    cfg: SegDiffConfig,
    train_items: Sequence[dict],
    val_items: Sequence[dict] = (),
    output: str | Path | None = None,
    epochs: int | None = None,
    max_minutes: float | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    iterations_per_epoch: int | None = None,
    init_state: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    val_samples: int = 2,
    val_every: int = 1,
    use_raters: bool | None = None,
    callback: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    ema_decay: float = 0.995,
) -> TrainResult:
    """Train ``cfg.network`` on labelled ``train_items``; write the best checkpoint to ``output``.

    Stops after ``epochs`` or ``max_minutes`` (whichever comes first; at least one is needed).
    ``callback`` receives a dict of stats after every epoch (for TensorBoard, MONAI Label status).
    """
    if epochs is None and max_minutes is None:
        raise ValueError("give epochs or max_minutes")
    if not train_items:
        raise InputError("no labelled case to train on")
    torch.manual_seed(seed)
    use_raters = cfg.network == "cimd" if use_raters is None else use_raters
    start_epoch, step, opt_state = 0, 0, None
    if resume is not None:
        init_state, cfg_r, rest = load_checkpoint(resume)
        cfg = cfg_r
        start_epoch, step = int(rest.get("epoch", 0)), int(rest.get("step", 0))
        opt_state = rest.get("optimizer")
    net = build_network(cfg).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    train_cases = load_cases(train_items, cfg, use_raters=use_raters, progress=progress)
    val_cases = load_cases(val_items, cfg, progress=progress) if val_items else []
    sampler = PatchSampler(train_cases, cfg, seed=seed)
    objective = DiffusionObjective(cfg, weight_fn=_weight_fn(cfg)) if cfg.is_diffusion else None
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # exponential moving average of the weights, used for validation and saved (Ho et al. 2020)
    ema = torch.optim.swa_utils.AveragedModel(net, avg_fn=_ema(ema_decay), use_buffers=True)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    if iterations_per_epoch is None:
        n_slices = sum(img.shape[-1] for img, _ in train_cases) if cfg.spatial_dims == 2 else 8 * len(train_cases)
        iterations_per_epoch = int(min(200, max(20, math.ceil(n_slices / batch_size))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    deadline = None if max_minutes is None else t0 + 60 * max_minutes
    total = epochs if epochs is not None else 10**9
    result = TrainResult(str(output) if output else None, 0, step, 0.0, -1.0, -1)
    best_state = None

    def save(state: dict, epoch: int) -> None:
        if output is not None:
            save_checkpoint(output, state, cfg, epoch=epoch, step=step, best_dice=result.best_dice)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=None if epochs is None else epochs * iterations_per_epoch, desc="train", unit="it")
    epoch = start_epoch
    for epoch in range(start_epoch + 1, start_epoch + total + 1):
        net.train()
        losses = []
        for _ in range(iterations_per_epoch):
            image, label = sampler.sample(batch_size)
            image, label = image.to(device), label.to(device)
            if objective is not None:
                loss, _logs = objective(net, image, to_onehot_scaled(label, cfg.num_classes), generator=gen)
            else:
                loss = supervised_loss(net(image), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            ema.update_parameters(net)
            step += 1
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if deadline is not None and time.perf_counter() > deadline:
                break
        result.losses.append(float(np.mean(losses)))
        stop = deadline is not None and time.perf_counter() > deadline
        last = stop or epoch == start_epoch + total
        dice = float("nan")
        if val_cases and (epoch % val_every == 0 or last):
            dice = validation_dice(ema.module, cfg, val_cases, num_samples=val_samples)
            result.val_dice.append(dice)
        score = dice if val_cases else -result.losses[-1]
        if not math.isnan(score) and (best_state is None or score > result.best_dice):
            result.best_dice, result.best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
            save(best_state, epoch)
        if callback is not None:
            callback({"epoch": epoch, "step": step, "loss": result.losses[-1], "val_dice": dice,
                      "best_dice": result.best_dice, "seconds": time.perf_counter() - t0})
        if stop:
            break
    if bar is not None:
        bar.close()
    if output is not None and (resume is not None or cfg.extra.get("keep_optimizer")):
        save_checkpoint(output, best_state or ema.module.state_dict(), cfg, epoch=epoch, step=step,
                        best_dice=result.best_dice, optimizer=opt.state_dict())
    result.epochs, result.steps, result.seconds = epoch - start_epoch, step, time.perf_counter() - t0
    if not val_cases:
        result.best_dice = float("nan")
    return result


def _ema(decay: float):
    """EMA update with a warm-up, so short runs are not dominated by the random initialisation."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return d * averaged + (1 - d) * current

    return avg


def _weight_fn(cfg: SegDiffConfig):
    """Boundary-aware loss weights (DermoSegDiff) when the config asks for them."""
    if not cfg.extra.get("boundary_loss", cfg.network == "dermosegdiff"):
        return None
    from .losses import BoundaryWeights

    return BoundaryWeights(cfg.train_timesteps, **cfg.extra.get("boundary_loss_args", {}))
