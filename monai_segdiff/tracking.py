"""TensorBoard logging of a training run through ``training.train(callback=...)``: the per-epoch loss,
validation Dice and learning rate become scalars in TensorBoard event files (``tensorboard --logdir``)."""

from __future__ import annotations

import datetime
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

# stats key of ``training.train``'s callback -> TensorBoard tag
TAGS = {"loss": "train/loss", "lr": "train/lr", "val_dice": "val/dice"}
TRACKING = ("none", "tensorboard")  # what a run can be tracked with

logger = logging.getLogger(__name__)


def run_dir(root: str | os.PathLike, name: str = "") -> Path:
    """A new run folder ``<root>/<name>-<YYYYmmdd-HHMMSS>`` (TensorBoard shows one curve per run folder)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / (f"{name}-{stamp}" if name else stamp)


def tracker(kind: str, root: str | os.PathLike, name: str = "") -> TensorBoardCallback | None:
    """A :class:`TensorBoardCallback` in a new run folder under ``root`` for ``kind`` "tensorboard";
    None for "none" (or "", "false"), for another kind, or without the tensorboard package (warned)."""
    kind = str(kind).strip().lower()
    if kind != "tensorboard":
        if kind not in ("none", "", "false"):
            logger.warning(f"tracking {kind!r} is not supported; use one of {', '.join(TRACKING)}")
        return None
    if importlib.util.find_spec("tensorboard") is None:  # SummaryWriter needs it
        logger.warning("tensorboard is not installed; tracking disabled")
        return None
    return TensorBoardCallback(run_dir(root, name))


class TensorBoardCallback:
    """Write the per-epoch stats of ``training.train`` as TensorBoard scalars (x axis: epoch).

    Non-finite values (no validation in that epoch) are skipped. Use as ``train(callback=writer)``,
    then ``writer.close()`` (or ``with TensorBoardCallback(...) as writer``).

    Args:
        log_dir: folder for the event files (created).
        then: another callback, called with the same stats after writing (e.g. progress reporting).
    """

    def __init__(self, log_dir: str | os.PathLike, then: Callable[[dict], None] | None = None) -> None:
        # lazy: tensorboard (protobuf, event writers) loads only for a run that logs to it
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.then = then

    def __call__(self, stats: dict) -> None:
        epoch = int(stats["epoch"])
        for key, tag in TAGS.items():
            value = stats.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()
        if self.then is not None:
            self.then(stats)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardCallback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
