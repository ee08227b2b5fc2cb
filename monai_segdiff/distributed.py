"""Data-parallel training with torch DDP: one process per GPU (NCCL), or several CPU processes (gloo).

``training.train`` stays the one training loop; inside a process group it uses the building blocks of
:mod:`monai_segdiff.ddp` (re-exported here: :func:`wrap`, :func:`any_rank`, :func:`rank_devices`,
:func:`launch` ...). :func:`train_distributed` runs it on several processes and hands rank 0's
per-epoch stats to a callback in the calling process, which is how the MONAI Label trainer honours its
``multi_gpu`` / ``gpus`` options. This launcher sits above the training loop: the loop never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

from .ddp import (  # noqa: F401  (the building blocks, importable from here as before)
    TIMEOUT,
    LossModule,
    any_rank,
    backend,
    is_main,
    launch,
    rank,
    rank_devices,
    run_ranks,
    world_size,
    wrap,
)
from .errors import DistributedError
from .training import train


def _train_rank(rank: int, device: str, queue: Any, args: tuple, kwargs: dict) -> None:
    """One rank of :func:`train_distributed`: rank 0 sends its per-epoch stats, every rank its result."""
    callback = (lambda stats: queue.put(("epoch", rank, stats))) if rank == 0 else None
    kwargs = dict(kwargs, device=device, callback=callback, progress=bool(kwargs.get("progress")) and rank == 0)
    queue.put(("result", rank, train(*args, **kwargs)))


def train_distributed(devices: Sequence[str], *args: Any, callback: Callable[[dict], None] | None = None,
                      **kwargs: Any) -> list:
    """``training.train(*args, **kwargs)`` on one process per entry of ``devices`` (DDP).

    ``callback`` runs in this process with rank 0's per-epoch stats. Returns every rank's
    ``TrainResult`` in rank order; rank 0's holds the validation scores and wrote the checkpoint.
    ``batch_size`` is per process, so each step sees ``len(devices) * batch_size`` samples.
    """
    queue = mp.get_context("spawn").SimpleQueue()
    results: dict[int, Any] = {}

    def poll() -> None:
        while not queue.empty():
            kind, rank_, payload = queue.get()
            if kind == "epoch" and callback is not None:
                callback(payload)
            elif kind == "result":
                results[rank_] = payload

    run_ranks(_train_rank, devices, (queue, args, kwargs), poll)
    if len(results) != len(devices):
        raise DistributedError(f"ranks {sorted(set(range(len(devices))) - set(results))} finished without a result")
    return [results[r] for r in range(len(devices))]
