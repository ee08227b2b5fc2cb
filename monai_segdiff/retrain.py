"""Retraining the model served for a studies folder: the policy the app's train task and ``segdiff train
--update`` share.

1. **Start** (:func:`choose_start`): fine-tune the current model when it was made for the studies' label
   set, images and spacing (:func:`training.fine_tune_mismatch`); otherwise train a new model for the
   studies' whole label set (:func:`training.new_config`).
2. **Baseline** (:func:`baseline_dice`): the current model's validation Dice on the run's own validation
   cases, with the run's metric (labels present in a reference or a prediction only).
3. **Publish** (:class:`Publisher`): every new best checkpoint of the run is copied atomically over the
   target when its Dice beats the baseline (a new model: beats 0), so a short, unlucky or empty run never
   replaces a better model; before a model for another label set first replaces a file, that file is kept
   as ``<target dir>/replaced/<name>-<mtime>.pt``.

Options come from the app's train request or the command line and are checked once, by
:meth:`RetrainOptions.from_request` (:class:`InputError` names the option and the allowed range).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from monai.utils import str2bool

from .atomic import copy_atomic
from .config import NETWORKS, SegDiffConfig, load_checkpoint
from .errors import CheckpointError, InputError
from .networks import build_network
from .planning import fine_tune_mismatch, new_config
from .training import TrainResult, check_labels, load_cases, split_validation, train, validation_dice

__all__ = ["RetrainOptions", "RetrainRun", "Start", "Publisher", "choose_start", "baseline_dice", "keep_replaced",
           "plan", "retrain"]

logger = logging.getLogger(__name__)

# request key -> (option, type, lowest allowed, lowest excluded, highest allowed or None)
REQUEST_NUMBERS: dict[str, tuple[str, type, float, bool, float | None]] = {
    "max_epochs": ("epochs", int, 0, False, None),
    "max_minutes": ("max_minutes", float, 0, False, None),
    "val_split": ("val_split", float, 0, False, 0.9),
    "train_batch_size": ("batch_size", int, 1, False, None),
    "learning_rate": ("lr", float, 0, True, None),
    "iterations_per_epoch": ("iterations_per_epoch", int, 0, False, None),
}


_TRAIN = {k: p.default for k, p in inspect.signature(train).parameters.items()}  # train()'s own defaults


@dataclass(frozen=True)
class RetrainOptions:
    """What one retraining run may be asked for.

    Args:
        epochs: epoch limit (None: none; with ``max_minutes`` also None, 10 epochs).
        max_minutes: time limit in minutes (None: none).
        val_split: fraction of the labelled cases (with foreground) held out to validate, 0..0.9.
        batch_size: training batch size.
        lr: learning rate.
        iterations_per_epoch: iterations per epoch (None: automatic).
        pretrained: fine-tune the current model when it fits the studies.
        network: network of a new model (one of ``config.NETWORKS``).
        seed: seed of the validation split and the training run.
        click_channels: a new model also learns from simulated clicks (``SegDiffConfig.click_channels``,
            :mod:`monai_segdiff.interaction`); a fine-tuned model keeps its own setting.
    """

    epochs: int | None = 10
    max_minutes: float | None = 30.0
    val_split: float = 0.2
    batch_size: int = _TRAIN["batch_size"]
    lr: float = _TRAIN["lr"]
    iterations_per_epoch: int | None = _TRAIN["iterations_per_epoch"]
    pretrained: bool = True
    network: str = field(default_factory=lambda: SegDiffConfig().network)
    seed: int = _TRAIN["seed"]
    click_channels: bool = False

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_minutes is None:
            object.__setattr__(self, "epochs", 10)

    @classmethod
    def from_request(cls, request: Mapping[str, Any], defaults: RetrainOptions | None = None) -> RetrainOptions:
        """Options from a MONAI Label train request (``max_epochs``, ``max_minutes``, ``val_split``,
        ``train_batch_size``, ``learning_rate``, ``iterations_per_epoch``, ``pretrained``, ``network``,
        ``click_channels``);
        a missing or empty value keeps ``defaults``; 0 epochs, minutes or iterations mean no limit /
        automatic. Raises :class:`InputError` naming the option for a value outside its range."""
        opts = defaults or cls()
        changes: dict[str, Any] = {}
        for key, (name, kind, low, open_low, high) in REQUEST_NUMBERS.items():
            value = request.get(key)
            if value is None or value == "":
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not (number > low if open_low else number >= low) or (high is not None and number > high):
                limit = (f"> {low}" if open_low else f">= {low}") + (f" and <= {high}" if high is not None else "")
                raise InputError(f"{key} must be a number {limit}, got {value!r}")
            changes[name] = kind(number) if number or name in ("val_split",) else None
        network = request.get("network")
        if network not in (None, ""):
            if network not in NETWORKS:
                raise InputError(f"unknown network {network!r}; use one of {', '.join(NETWORKS)}")
            changes["network"] = str(network)
        for key in ("pretrained", "click_channels"):
            if request.get(key) not in (None, ""):
                try:
                    changes[key] = str2bool(str(request[key]).strip())
                except ValueError:
                    raise InputError(f"{key} must be true or false, got {request[key]!r}") from None
        return replace(opts, **changes)


@dataclass
class Start:
    """Where a run starts: ``config`` and ``state`` (None for a new model), ``init`` ``"pretrained"`` or
    ``"scratch"``, ``reason`` why the current model is not fine-tuned (None when it is)."""

    config: SegDiffConfig
    state: dict | None
    init: str
    source: str | None = None
    reason: str | None = None


def choose_start(source: str | os.PathLike | None, items: Sequence[dict], labels: Sequence[str],
                 options: RetrainOptions) -> Start:
    """Fine-tune ``source`` (the current model) when ``options.pretrained`` and it was made for ``labels``
    (same names in the same order), these images and their spacing; else a new ``options.network`` model
    for the whole label set. An unreadable ``source`` is a reason, not an error: a new model is trained."""
    reason = None
    if not options.pretrained:
        reason = "pretrained is off"
    elif source is None or not os.path.isfile(source):
        reason = "there is no current model"
    else:
        try:
            state, cfg, _ = load_checkpoint(source)
        except CheckpointError as e:
            reason = f"the current model cannot be read ({e})"
        else:
            reason = fine_tune_mismatch(cfg, items, list(labels))
            if reason is None:
                logger.info(f"fine-tuning {source} ({cfg.network}, labels {cfg.labels})")
                return Start(cfg, state, "pretrained", str(source))
    logger.info(f"training a new {options.network} model for labels {list(labels)}: {reason}")
    cfg = new_config(items, list(labels), network=options.network, click_channels=options.click_channels)
    return Start(cfg, None, "scratch", None, reason)


def baseline_dice(start: Start, val_items: Sequence[dict], device: str = "cpu") -> float | None:
    """The current model's validation Dice on ``val_items`` (the metric of the run), which a fine-tuned
    run must beat to be published; None for a new model or without validation cases."""
    if start.state is None or not val_items:
        return None
    net = build_network(start.config).to(device)
    net.load_state_dict(start.state)
    dice = validation_dice(net, start.config, load_cases(val_items, start.config))
    logger.info(f"current model: validation Dice {dice:.4f} on {len(val_items)} case(s)")
    return dice if math.isfinite(dice) else None


def keep_replaced(target: str | os.PathLike) -> Path | None:
    """Keep an existing ``target`` as ``<dir>/replaced/<name>-<mtime>.pt`` (a model someone used is never
    lost when a model for another label set replaces it); the kept path, or None without a file."""
    target = Path(target)
    if not target.is_file():
        return None
    kept = target.parent / "replaced" / f"{target.stem}-{int(target.stat().st_mtime)}.pt"
    copy_atomic(target, kept, keep_suffix=False)
    logger.info(f"kept the replaced model as {kept}")
    return kept


class Publisher:
    """Publish a run's best checkpoint over ``target`` whenever it beats ``baseline`` on foreground.

    Call it after every epoch with the run's stats (``best_dice``): when ``candidate`` (the run's best
    checkpoint) was written anew and its Dice beats ``baseline`` (None: 0), it is copied atomically to
    ``target``, so readers see the old or the new file, never a part.

    Args:
        candidate: the checkpoint file the run writes (``train(output=...)``).
        target: the published model file.
        baseline: the current model's validation Dice (None for a new model).
        keep_existing: keep an existing ``target`` under ``replaced/`` before the first publish (for a
            new model that replaces one made for another label set).
    """

    def __init__(self, candidate: str | os.PathLike, target: str | os.PathLike, baseline: float | None,
                 keep_existing: bool = False):
        self.candidate, self.target = Path(candidate), Path(target)
        self.baseline, self.keep_existing = baseline, keep_existing
        self.published = False
        self.best_epoch: int | None = None
        self.kept: Path | None = None
        self._seen: int | None = None

    def __call__(self, stats: Mapping[str, Any]) -> bool:
        """Publish if the run saved a new best that beats the baseline; True when it published now."""
        saved = self.candidate.stat().st_mtime_ns if self.candidate.is_file() else None
        if saved is None or saved == self._seen:
            return False
        self._seen = saved
        self.best_epoch = stats.get("epoch")
        best = stats.get("best_dice")
        if best is None or not math.isfinite(best) or best <= (self.baseline or 0.0):
            return False
        if not self.published and self.keep_existing:
            self.kept = keep_replaced(self.target)
        copy_atomic(self.candidate, self.target, keep_suffix=False)
        self.published = True
        logger.info(f"epoch {stats.get('epoch')}: published {self.target} (validation Dice {best:.4f})")
        return True

    def note(self, best: float | None, validated: bool) -> str | None:
        """Why nothing was published (None if something was)."""
        if self.published:
            return None
        if not validated:
            return "not published: no validation case to check the model on (val_split 0)"
        if self.baseline is not None:
            shown = f"{best:.4f}" if best is not None and math.isfinite(best) else "none"
            return (f"not published: best validation Dice {shown} of this run did not beat the current "
                    f"model's {self.baseline:.4f} on the same validation cases")
        return "not published: no epoch found any of the labels on the validation cases (Dice 0)"


@dataclass
class RetrainRun:
    """A planned run: where it starts, its cases, and the baseline it must beat."""

    start: Start
    train_items: list[dict]
    val_items: list[dict]
    baseline: float | None


def plan(items: Sequence[dict], labels: Sequence[str], source: str | os.PathLike | None, options: RetrainOptions,
         device: str = "cpu") -> RetrainRun:
    """Check the labels (:func:`training.check_labels`), split off validation cases with foreground,
    choose the start and measure the baseline. :class:`InputError` when the labels cannot train a model."""
    if not items:
        raise InputError("no labelled image to train on: submit a final label first")
    foreground = check_labels(items, list(labels))
    split = options.val_split if len(items) > 1 else 0.0
    train_items, val_items = split_validation(list(items), foreground, split, seed=options.seed)
    start = choose_start(source, items, labels, options)
    return RetrainRun(start, train_items, val_items, baseline_dice(start, val_items, device))


def retrain(run: RetrainRun, target: str | os.PathLike, options: RetrainOptions, device: str = "cpu",
            callback: Callable[[dict], None] | None = None,
            runner: Callable[..., Sequence[TrainResult]] | None = None, **train_options: Any) -> tuple[list[TrainResult], Publisher]:
    """Train ``run`` and publish to ``target`` whenever the run's best beats the baseline; the results
    (one per process, the first validated and saved) and the publisher (``published``, ``note()``).

    The run writes its best checkpoint to a hidden candidate file beside ``target`` (removed at the end);
    ``callback`` gets the epoch stats after the publisher has seen them (``stats["published"]``).
    ``runner(cfg, train_items, val_items, **kwargs) -> [results]`` replaces the single-process
    :func:`training.train` (e.g. ``distributed.train_distributed`` bound to its ranks); other keyword
    arguments go to it unchanged."""
    target = Path(target)
    candidate = target.parent / f".{target.name}.candidate"
    publisher = Publisher(candidate, target, run.baseline, keep_existing=run.start.init == "scratch")

    def on_epoch(stats: dict) -> None:
        publisher(stats)
        if callback is not None:
            callback({**stats, "published": publisher.published})

    kwargs = dict(output=candidate, epochs=options.epochs, max_minutes=options.max_minutes,
                  batch_size=options.batch_size, lr=options.lr, iterations_per_epoch=options.iterations_per_epoch,
                  init_state=run.start.state, seed=options.seed, callback=on_epoch, **train_options)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if runner is not None:
            results = list(runner(run.start.config, run.train_items, run.val_items, **kwargs))
        else:
            results = [train(run.start.config, run.train_items, run.val_items, device=device, **kwargs)]
    finally:
        candidate.unlink(missing_ok=True)
    return results, publisher
