"""The training loop shared by the CLI and the MONAI Label trainer: preprocess the labelled cases
once into memory, sample foreground-aware slices / patches, optimise the diffusion objective (or
Dice + CE for the baseline), validate with few-step samples, keep the best checkpoint."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import ddp
from .config import SegDiffConfig, load_checkpoint, save_checkpoint, training_state_path
from .data import split
from .diffusion.inferer import SegDiffInferer
from .diffusion.objective import DiffusionObjective, supervised_loss
from .diffusion.sampler import build_sampler
from .errors import InputError
from .interaction import with_simulated_clicks
from .io import load_label
from .losses import BoundaryWeights
from .networks import build_network
from .planning import (  # noqa: F401  (the planning of a new model, importable from here as before)
    _ct_window,
    auto_intensity,
    auto_roi,
    auto_spacing,
    fine_tune_mismatch,
    image_spacing,
    new_config,
)
from .transforms import UNANNOTATED, PatchSampler, apply, preprocess_transforms, to_onehot_scaled


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


def check_labels(items: Sequence[dict], labels: Sequence[str]) -> list[bool]:
    """Read every item's label before training: ``InputError`` if one holds values outside the label
    set (0..K for the K ``labels``) or if none holds any foreground (a model trained on empty labels
    learns to find nothing, and its validation would reward it). Returns per item: has foreground."""
    names = {"background": 0, **{n: i + 1 for i, n in enumerate(labels)}}
    foreground = []
    for item in items:
        lab = load_label(item["label"], names)
        values = [int(v) for v in torch.unique(lab.as_tensor())]
        bad = [v for v in values if v < 0 or v > len(labels)]
        if bad:
            raise InputError(
                f"the label of {item.get('id', item['label'])} holds values {bad[:10]} outside the label set "
                f"{names}: fix the label or the studies' labels.json"
            )
        foreground.append(any(v > 0 for v in values))
    if items and not any(foreground):
        raise InputError(
            f"all {len(items)} label(s) are empty (no foreground voxel of {', '.join(labels)}): nothing to learn; "
            "draw the structures and submit the labels again"
        )
    return foreground


def split_validation(items: Sequence[dict], foreground: Sequence[bool], val_fraction: float,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train / validation split (``data.split``) that validates only on labels with foreground; the
    empty ones train as negatives. ``InputError`` when validation is asked for and fewer than two
    labels have foreground (one to learn from, one to check the model on)."""
    positive = [it for it, f in zip(items, foreground) if f]
    negative = [it for it, f in zip(items, foreground) if not f]
    if val_fraction > 0 and len(positive) < 2:
        raise InputError(
            f"{len(positive)} of {len(items)} label(s) hold foreground; training needs at least 2 (one to learn from, "
            "one to check the model on before it is published)"
        )
    train_items, val_items = split(positive, val_fraction, seed=seed)
    return train_items + negative, val_items


def load_cases(
    items: Sequence[dict], cfg: SegDiffConfig, use_raters: bool = False, progress: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocess labelled cases once: ``[(image [C, ...], labels [R, ...] uint8)]``. A partial label (the
    item's ``annotated`` record, ``data.annotated_slices``) holds ``UNANNOTATED`` outside its annotated
    slices; a 2D model trains only on fully annotated slices (:class:`~monai_segdiff.transforms.PatchSampler`)."""
    out = []
    it = items
    if progress:
        it = tqdm(items, desc="loading", unit="case", leave=False)
    for item in it:
        keys = ["label"] + ([f"rater{i}" for i in range(len(item.get("raters", [])))] if use_raters else [])
        data = {"image": item["image"], "label": item["label"]}
        if use_raters:
            data.update({f"rater{i}": p for i, p in enumerate(item.get("raters", []))})
        partial = bool(item.get("annotated"))
        if partial:
            data["annotated"] = item["annotated"]
        try:
            d = apply(preprocess_transforms(cfg, label_keys=keys, partial=partial), data)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot load case {item.get('id', item['image'])}: {str(e).splitlines()[0][:300]}") from e
        img = d["image"].as_tensor().float()
        if img.shape[0] != cfg.image_channels:
            raise InputError(f"{item['image']} has {img.shape[0]} channels, expected {cfg.image_channels}")
        labels = torch.cat([d[k].as_tensor() for k in keys]).to(torch.uint8)
        out.append((img, labels))  # 2D images stay [C, X, Y]: sampled and segmented whole
    return out


def validation_dice(net: nn.Module, cfg: SegDiffConfig, cases, num_samples: int = 2, steps: int | None = None) -> float:
    """Foreground Dice of the fused few-step ensemble on preprocessed cases, pooled over the cases
    per label (global Dice: summed overlaps / summed sizes), then averaged over the labels present in
    a reference or a prediction; NaN when no label is present anywhere (empty vs empty is no score).

    Pooling keeps model selection stable: with per-case Dice a few false-positive voxels of a small
    label in a case without it flip that case's score from 1 to 0 (seen as 0.65 -> 0.41 swings
    between fine-tuning epochs on the phantoms, whose lesion is absent in some cases)."""
    if not cases:
        return float("nan")
    sampler = build_sampler(cfg, steps=steps)
    inferer = SegDiffInferer(
        sampler.members_and_anchor, num_samples, cfg.num_classes, cfg.spatial_dims, cfg.context, cfg.divisor,
        roi_size=cfg.roi_size if cfg.spatial_dims == 3 else None, seed=0, anchor_share=cfg.anchor_share,
    )
    net.eval()
    def run(img: torch.Tensor) -> torch.Tensor:  # a click-trained network is scored without clicks
        side = torch.zeros(cfg.guidance_channels, *img.shape[1:]) if cfg.click_channels else None
        return inferer(img, net, side=side).probs.argmax(0)

    return pooled_dice(((run(img), labels[0].long()) for img, labels in cases), cfg.num_classes)


def pooled_dice(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> float:
    """Dice of ``(prediction, reference)`` label maps pooled per foreground label (summed overlaps /
    summed sizes), averaged over the labels present in a reference or a prediction (only where the
    reference is annotated: ``UNANNOTATED`` voxels of a partial label do not count); NaN when none is:
    an empty prediction of an empty reference is no evidence that a model works, never a score of 1
    (MONAI's ``DiceMetric`` scores per image, where pooling is what keeps selection stable here)."""
    overlap, size = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
    for pred, ref in pairs:
        annotated = ref != UNANNOTATED  # a partial reference scores only its annotated voxels
        if not bool(annotated.all()):
            pred, ref = pred[annotated], ref[annotated]
        for c in range(1, num_classes):
            overlap[c - 1] += float(((pred == c) & (ref == c)).sum())
            size[c - 1] += float((pred == c).sum() + (ref == c).sum())
    present = size > 0
    if not present.any():
        return float("nan")
    return float((2 * overlap[present] / size[present]).mean())


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
    warmup_steps: int | None = None,
    lr_schedule: str = "constant",
    keep: str = "best",
    save_state: bool = False,
    options: dict | None = None,
) -> TrainResult:
    """Train ``cfg.network`` on labelled ``train_items``; write the best checkpoint to ``output``.

    Stops after ``epochs`` or ``max_minutes`` (whichever comes first; at least one is needed).
    ``callback`` receives a dict of stats after every epoch (for TensorBoard, MONAI Label status).

    Fine-tuning (``init_state`` without ``resume``) ramps the learning rate up linearly over
    ``warmup_steps`` (default: 100) and starts the weight average from the given weights: a fresh
    Adam at full rate moves every weight of a trained model by ~lr per step in the first steps,
    which dropped validation Dice from 0.65 to 0.43 in one epoch before this warm-up.

    ``lr_schedule``: ``constant`` (after the warm-up), or ``cosine``: the rate falls along half a
    cosine to 1 % of ``lr`` at the end of the run, which ends at ``epochs`` or ``max_minutes``,
    whichever is nearer (a time-limited run follows the clock).

    ``keep``: ``best`` writes the averaged weights of the epoch with the best validation Dice (or, without
    validation cases, the lowest loss); ``last`` those of the last epoch, e.g. at the end of a cosine
    decay (``best_dice`` / ``best_epoch`` then describe that epoch).

    ``save_state`` writes ``<output>.state`` after every epoch (``config.training_state_path``: raw and
    averaged weights, optimiser, scheduler, epoch, step, best score, random generators and the
    caller's plain-type ``options``); ``resume=<checkpoint>`` continues from it exactly, as if the run
    had not stopped (without the state file, from the checkpoint's weights and optimiser, if any).
    """
    return Trainer(
        cfg, train_items, val_items, output=output, epochs=epochs, max_minutes=max_minutes, batch_size=batch_size,
        lr=lr, iterations_per_epoch=iterations_per_epoch, init_state=init_state, seed=seed, device=device,
        progress=progress, val_samples=val_samples, val_every=val_every, use_raters=use_raters, callback=callback,
        resume=resume, ema_decay=ema_decay, warmup_steps=warmup_steps, lr_schedule=lr_schedule, keep=keep,
        save_state=save_state, options=options,
    ).run()


class Trainer:
    """One run of :func:`train` (same arguments), in named steps: :meth:`resume_from` (a checkpoint or
    its training state), :meth:`build` (network, cases, sampler, objective, optimiser, weight average,
    learning-rate schedule), then per epoch :meth:`train_epoch`, :meth:`validate`, :meth:`keep_best`,
    :meth:`save_training_state` and :meth:`report`, and :meth:`finish`. The order of every random draw
    is that of the loop it replaces, so a run and a resumed run stay bit-identical."""

    def __init__(self, cfg: SegDiffConfig, train_items: Sequence[dict], val_items: Sequence[dict] = (), *,
                 output: str | Path | None = None, epochs: int | None = None, max_minutes: float | None = None,
                 batch_size: int = 16, lr: float = 1e-3, iterations_per_epoch: int | None = None,
                 init_state: dict | None = None, seed: int = 0, device: str = "cpu", progress: bool = False,
                 val_samples: int = 2, val_every: int = 1, use_raters: bool | None = None,
                 callback: Callable[[dict], None] | None = None, resume: str | Path | None = None,
                 ema_decay: float = 0.995, warmup_steps: int | None = None, lr_schedule: str = "constant",
                 keep: str = "best", save_state: bool = False, options: dict | None = None) -> None:
        if epochs is None and max_minutes is None:
            raise ValueError("give epochs or max_minutes")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        if not train_items:
            raise InputError("no labelled case to train on")
        self.cfg, self.train_items, self.val_items, self.output = cfg, train_items, val_items, output
        self.epochs, self.max_minutes, self.batch_size, self.lr = epochs, max_minutes, batch_size, lr
        self.iterations_per_epoch, self.init_state, self.seed, self.device = iterations_per_epoch, init_state, seed, device
        self.progress, self.val_samples, self.val_every, self.callback = progress, val_samples, val_every, callback
        self.resume, self.ema_decay, self.warmup_steps = resume, ema_decay, warmup_steps
        self.lr_schedule, self.keep, self.options = lr_schedule, keep, options
        self.use_raters = cfg.network == "cimd" if use_raters is None else use_raters
        self.save_state = save_state or bool(cfg.extra.get("keep_optimizer"))
        self.start_epoch, self.step, self.opt_state, self.saved, self.best_saved = 0, 0, None, None, None
        self.lr_progress0 = 0.0  # share of the learning-rate schedule already run (a resumed run continues it)
        self.lr_progress = 0.0

    # -- set-up -------------------------------------------------------------------------------------
    def resume_from(self, checkpoint: str | Path) -> None:
        """Weights, config, epoch and step of ``checkpoint``; with its ``.state`` file, everything else."""
        self.init_state, self.cfg, rest = load_checkpoint(checkpoint)
        self.start_epoch, self.step = int(rest.get("epoch", 0)), int(rest.get("step", 0))
        self.opt_state = rest.get("optimizer")
        self.saved = _load_state(checkpoint)
        if self.saved is not None:
            saved = self.saved
            self.best_saved, self.init_state, self.opt_state = self.init_state, saved["model"], None
            self.start_epoch, self.step = int(saved["epoch"]), int(saved["step"])
            self.warmup_steps = saved["warmup_steps"] if self.warmup_steps is None else self.warmup_steps
            self.lr_progress0 = float(saved.get("lr_progress", 0.0))

    def build(self) -> None:
        """Network, cases, patch sampler, objective, optimiser, weight average and schedule."""
        cfg, saved = self.cfg, self.saved
        self.net = build_network(cfg).to(self.device)
        if self.init_state is not None:
            self.net.load_state_dict(self.init_state)
        self.train_cases = load_cases(self.train_items, cfg, use_raters=self.use_raters, progress=self.progress)
        self.val_cases = (load_cases(self.val_items, cfg, progress=self.progress)
                          if self.val_items and ddp.is_main() else [])
        if not any(_has_foreground(lab) for _, lab in self.train_cases):
            raise InputError("every training label is empty (no foreground voxel): nothing to learn")
        if self.val_cases and not any(_has_foreground(lab[:1]) for _, lab in self.val_cases):
            raise InputError("the validation labels are all empty: no foreground to score the model on")
        self.sampler = PatchSampler(self.train_cases, cfg, seed=self.seed + ddp.rank())  # DDP: other batches per rank
        objective = DiffusionObjective(cfg, weight_fn=_weight_fn(cfg)) if cfg.is_diffusion else None
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        self.fine_tune = (bool(saved["fine_tune"]) if saved is not None
                          else self.init_state is not None and self.resume is None)
        if self.warmup_steps is None:
            self.warmup_steps = 100 if self.fine_tune else 0
        # exponential moving average of the weights, used for validation and saved (Ho et al. 2020);
        # when fine-tuning, the average starts from the trained weights instead of warming up from them
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.net, avg_fn=_ema(self.ema_decay, offset=100 if self.fine_tune else 0), use_buffers=True
        )
        if self.opt_state is not None:
            self.opt.load_state_dict(self.opt_state)
        self.lr_progress = self.lr_progress0
        cosine = self.lr_schedule == "cosine"
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: _lr_factor(i, self.warmup_steps, self.lr_progress if cosine else 0.0)
        )
        if saved is not None:  # after the scheduler, whose first step rewrites the learning rate
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            self.ema.load_state_dict(saved["ema"])
        if self.iterations_per_epoch is None:
            n_slices = (self.sampler.num_slices() if cfg.spatial_dims == 2 else 8 * len(self.train_cases))
            self.iterations_per_epoch = int(min(200, max(20, math.ceil(n_slices / self.batch_size))))
        self.gen = torch.Generator().manual_seed(self.seed + ddp.rank())
        if saved is not None and ddp.is_main():  # the state holds rank 0's; other ranks keep their own seeds
            _set_rng_states(saved["rng"], self.gen, self.sampler)
        # the batch loss as one module: DDP (gradients averaged over ranks) inside a process group
        self.model = ddp.wrap(self.net, functools.partial(step_loss, cfg=cfg, objective=objective, generator=self.gen),
                              self.device)

    # -- the clock ----------------------------------------------------------------------------------
    def past_deadline(self) -> bool:
        """Has any rank run out of time?"""
        return self.deadline is not None and ddp.any_rank(time.perf_counter() > self.deadline)

    def run_share(self) -> float:
        """How far this run is towards its end (steps or clock, whichever is further)."""
        share = (self.step - self.step0) / (self.total * self.iterations_per_epoch)
        if self.deadline is not None:
            share = max(share, (time.perf_counter() - self.t0) / (60 * self.max_minutes))
        return min(1.0, share)

    # -- one epoch ----------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """``iterations_per_epoch`` optimiser steps (fewer at the deadline); their mean loss."""
        self.net.train()
        losses = []
        for _ in range(self.iterations_per_epoch):
            image, label = self.sampler.sample(self.batch_size)
            loss = self.model(image.to(self.device), label.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            self.lr_progress = self.lr_progress0 + (1.0 - self.lr_progress0) * self.run_share()
            self.sched.step()
            self.ema.update_parameters(self.net)
            losses.append(float(loss.detach()))
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if self.past_deadline():
                break
        return float(np.mean(losses))

    def validate(self) -> float:
        """Validation Dice of the averaged weights (NaN: no validation case)."""
        return validation_dice(self.ema.module, self.cfg, self.val_cases, num_samples=self.val_samples)

    def keep_best(self, score: float, epoch: int) -> None:
        """Write the averaged weights when ``score`` (Dice, or minus the loss) is the best so far."""
        if not math.isnan(score) and (self.best_state is None or score > self.result.best_dice):
            self.result.best_dice, self.result.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}
            self.save(self.best_state, epoch)

    def save(self, state: dict, epoch: int) -> None:
        if self.output is not None and ddp.is_main():
            save_checkpoint(self.output, state, self.cfg, epoch=epoch, step=self.step, best_dice=self.result.best_dice)

    def save_training_state(self, epoch: int) -> None:
        """``<output>.state``: everything :meth:`resume_from` needs to continue exactly."""
        if self.output is not None and self.save_state and ddp.is_main():
            save_checkpoint(
                training_state_path(self.output), self.net.state_dict(), self.cfg, ema=self.ema.state_dict(),
                optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), epoch=epoch, step=self.step,
                best_dice=self.result.best_dice, best_epoch=self.result.best_epoch, warmup_steps=self.warmup_steps,
                fine_tune=self.fine_tune, lr_progress=self.lr_progress, rng=_rng_states(self.gen, self.sampler),
                options=dict(self.options or {}),
            )

    def report(self, epoch: int, dice: float) -> None:
        if self.callback is not None and ddp.is_main():
            self.callback({"epoch": epoch, "step": self.step, "loss": self.result.losses[-1], "val_dice": dice,
                           "best_dice": self.result.best_dice, "seconds": time.perf_counter() - self.t0,
                           "lr": self.opt.param_groups[0]["lr"]})

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        torch.manual_seed(self.seed)
        if self.resume is not None:
            self.resume_from(self.resume)
        self.build()
        self.t0 = time.perf_counter()
        self.deadline = None if self.max_minutes is None else self.t0 + 60 * self.max_minutes
        self.total = self.epochs if self.epochs is not None else 10**9
        self.step0 = self.step
        self.result = TrainResult(str(self.output) if self.output else None, 0, self.step, 0.0, -1.0, -1)
        self.best_state = None
        if (self.saved is not None and self.output is not None
                and Path(self.output).resolve() == Path(self.resume).resolve()):
            # same model file: a resumed epoch replaces it only if it beats the best so far
            self.result.best_dice, self.result.best_epoch = float(self.saved["best_dice"]), int(self.saved["best_epoch"])
            self.best_state = self.best_saved
        self.bar = None
        if self.progress:
            self.bar = tqdm(total=None if self.epochs is None else self.epochs * self.iterations_per_epoch,
                            desc="train", unit="it")
        epoch, score = self.start_epoch, float("nan")
        for epoch in range(self.start_epoch + 1, self.start_epoch + self.total + 1):
            self.result.losses.append(self.train_epoch())
            stop = self.past_deadline()
            dice = float("nan")
            if self.val_cases and (epoch % self.val_every == 0 or stop or epoch == self.start_epoch + self.total):
                dice = self.validate()
                self.result.val_dice.append(dice)
            score = dice if self.val_cases else -self.result.losses[-1]
            self.keep_best(score, epoch)
            self.save_training_state(epoch)
            self.report(epoch, dice)
            if stop:
                break
        if self.bar is not None:
            self.bar.close()
        return self.finish(epoch, score)

    def finish(self, epoch: int, score: float) -> TrainResult:
        """With ``keep="last"`` write the last epoch's averaged weights; the run's summary."""
        if self.keep == "last" and epoch > self.start_epoch:
            self.result.best_dice, self.result.best_epoch = score, epoch
            self.save(self.ema.module.state_dict(), epoch)
        self.result.epochs, self.result.steps = epoch - self.start_epoch, self.step
        self.result.seconds = time.perf_counter() - self.t0
        if not self.val_cases:
            self.result.best_dice = float("nan")
        return self.result


def step_loss(
    net: nn.Module, image: torch.Tensor, label: torch.Tensor, cfg: SegDiffConfig,
    objective: DiffusionObjective | None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss of one batch: the diffusion objective, or Dice + CE for the deterministic baseline (a
    click-trained model first gets simulated clicks as guidance channels)."""
    if cfg.click_channels:
        image = with_simulated_clicks(net, image, label, cfg, generator)
    if objective is not None:
        return objective(net, image, to_onehot_scaled(label, cfg.num_classes), generator=generator)[0]
    return supervised_loss(net(image), label)


LR_SCHEDULES = ("constant", "cosine")
KEEP = ("best", "last")  # which epoch's weights train() writes to its output
LR_FLOOR = 0.01  # the cosine schedule's last rate, as a share of the first


def _lr_factor(i: int, warmup_steps: int, progress: float) -> float:
    """Learning-rate multiplier after ``i`` steps: linear warm-up times half a cosine at ``progress``
    (0 keeps the full rate)."""
    warm = min(1.0, (i + 1) / warmup_steps) if warmup_steps else 1.0
    if progress <= 0.0:
        return warm
    return warm * (LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _ema(decay: float, offset: int = 0):
    """EMA update with a warm-up, so short runs are not dominated by the random initialisation;
    ``offset`` skips part of the warm-up (fine-tuning starts from weights worth keeping)."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged) + offset
        d = min(decay, (1 + n) / (10 + n))
        return d * averaged + (1 - d) * current

    return avg


def _has_foreground(labels: torch.Tensor) -> bool:
    """Does a preprocessed label hold an annotated foreground voxel (``UNANNOTATED`` is none)?"""
    return bool(((labels > 0) & (labels != UNANNOTATED)).any())


def _weight_fn(cfg: SegDiffConfig):
    """Boundary-aware loss weights (DermoSegDiff) when the config asks for them."""
    if not cfg.extra.get("boundary_loss", cfg.network == "dermosegdiff"):
        return None
    return BoundaryWeights(cfg.train_timesteps, **cfg.extra.get("boundary_loss_args", {}))


def _load_state(checkpoint: str | Path) -> dict | None:
    """The resume state beside ``checkpoint`` (``rest`` of the state file plus its raw weights), or None."""
    path = training_state_path(checkpoint)
    if not path.is_file():
        return None
    model, _cfg, rest = load_checkpoint(path)
    return {**rest, "model": model}


def _rng_states(gen: torch.Generator, sampler: PatchSampler) -> dict:
    """Random-generator states as tensors and plain types (``torch.load(weights_only=True)``)."""
    return {"torch": torch.get_rng_state(), "objective": gen.get_state(),
            "sampler": json.dumps(sampler.rng.bit_generator.state)}  # numpy's 128-bit ints as text


def _set_rng_states(states: dict, gen: torch.Generator, sampler: PatchSampler) -> None:
    torch.set_rng_state(states["torch"])
    gen.set_state(states["objective"])
    sampler.rng.bit_generator.state = json.loads(states["sampler"])
