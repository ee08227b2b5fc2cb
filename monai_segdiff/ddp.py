"""Torch DDP building blocks: one process per GPU (NCCL), or several CPU processes (gloo).

``training.train`` stays the one training loop. Inside a process group it computes each batch's loss
through :func:`wrap` (DDP averages the gradients over the ranks in ``backward``), draws different
batches on each rank (the sampler seed is offset by the rank), stops all ranks at the same iteration
(:func:`any_rank`), and lets rank 0 alone validate, report and save. :func:`launch` and
:func:`run_ranks` run a function on several processes joined in one group; the training launcher
(``distributed.train_distributed``) sits above the training loop and uses them, so this module never
imports the loop it serves.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .errors import DistributedError

TIMEOUT = datetime.timedelta(minutes=60)  # other ranks wait while rank 0 validates alone

# -- inside a process group ------------------------------------------------------------------------
def world_size() -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that validates, reports and saves."""
    return rank() == 0


def any_rank(flag: bool) -> bool:
    """``flag`` of any rank, on every rank (so that all ranks leave a loop at the same iteration)."""
    if world_size() < 2:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class LossModule(nn.Module):
    """``net`` and its training loss as one module: DDP must see every use of the parameters (the
    denoiser's ``condition`` and its per-step ``forward``) inside a single ``forward`` call.

    Args:
        net: the network being trained.
        loss_fn: ``loss_fn(net, *batch) -> scalar loss``.
    """

    def __init__(self, net: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.net, *batch)


def wrap(net: nn.Module, loss_fn: Callable[..., torch.Tensor], device: str | torch.device = "cpu") -> nn.Module:
    """``module(*batch) -> loss`` of ``net``: wrapped in DDP (gradients averaged over the ranks, weights
    broadcast from rank 0) inside a process group of several ranks, a plain module otherwise."""
    module = LossModule(net, loss_fn)
    if world_size() < 2:
        return module
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # every network of the library uses all its parameters in the training loss (checked for all five)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


# -- starting processes -----------------------------------------------------------------------------
def rank_devices(multi_gpu: bool, gpus: str | Sequence[int] | None = "all", device: str = "cuda") -> list[str]:
    """One device per process from MONAI Label's ``multi_gpu`` and ``gpus`` (``"all"`` or ``"0,1"``).

    With CUDA: the listed (or all visible) GPUs. Without CUDA: one CPU process (gloo) per listed id, so
    ``gpus="0,1"`` runs two CPU processes. MONAI Label's task runner hands the trainer ``"all"`` and the
    ids as ``CUDA_VISIBLE_DEVICES``, which then count. A single device means no DDP.
    """
    if not multi_gpu:
        return [str(device)]
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    text = ",".join(str(g) for g in gpus) if isinstance(gpus, (list, tuple)) else str(gpus or "all").strip()
    if text.lower() == "all":
        if cuda:
            count = torch.cuda.device_count()
            return [f"cuda:{i}" for i in range(count)] if count > 1 else [str(device)]
        visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip() not in ("", "-1")]
        return ["cpu"] * len(visible) if len(visible) > 1 else [str(device)]
    try:
        ids = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"gpus must be 'all' or comma-separated GPU ids like '0,1', got {gpus!r}") from None
    if cuda:
        ids = [i for i in ids if i < torch.cuda.device_count()]
        return [f"cuda:{i}" for i in ids] if len(ids) > 1 else [str(device)]
    return ["cpu"] * len(ids) if len(ids) > 1 else [str(device)]


def backend(devices: Sequence[str]) -> str:
    """NCCL when every rank has a GPU, gloo otherwise."""
    return "nccl" if all(str(d).startswith("cuda") for d in devices) and dist.is_nccl_available() else "gloo"


@contextlib.contextmanager
def _rendezvous() -> Iterator[str]:
    """A ``file://`` init method in a fresh temporary folder, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="segdiff-ddp-")
    try:
        yield f"file://{os.path.join(folder, 'rendezvous')}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rank_main(index: int, fn: Callable, devices: Sequence[str], init_method: str, args: tuple) -> None:
    """Entry of a spawned process: join the group as rank ``index``, run ``fn(rank, device, *args)``."""
    device = torch.device(devices[index])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    dist.init_process_group(backend(devices), init_method=init_method, rank=index, world_size=len(devices),
                            timeout=TIMEOUT)
    try:
        fn(index, str(device), *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], devices: Sequence[str], *args: Any) -> None:
    """Run ``fn(rank, device, *args)`` in one spawned process per entry of ``devices``, joined in one
    process group; returns when all ranks are done, raises ``DistributedError`` if one fails.
    ``fn`` and ``args`` must be picklable (``fn`` a module-level function)."""
    run_ranks(fn, devices, args)


def run_ranks(fn: Callable[..., Any], devices: Sequence[str], args: tuple = (),
              poll: Callable[[], None] | None = None) -> None:
    """:func:`launch` with ``poll()`` called in this process while the ranks run (and once after), e.g.
    to drain a queue the ranks report to."""
    with _rendezvous() as init_method:
        ctx = mp.start_processes(_rank_main, args=(fn, list(devices), init_method, tuple(args)),
                                 nprocs=len(devices), join=False, start_method="spawn")
        _join(ctx, poll)


def _join(ctx: mp.ProcessContext, poll: Callable[[], None] | None = None) -> None:
    """Wait for all ranks (calling ``poll`` meanwhile); one failing rank stops the others."""
    try:
        while not ctx.join(timeout=0.5):
            if poll is not None:
                poll()
    except mp.ProcessRaisedException as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise DistributedError(f"a DDP process failed: {lines[-1] if lines else e}") from None
    except mp.ProcessExitedException as e:
        raise DistributedError(f"a DDP process exited: {e}") from None
    except BaseException:  # e.g. the callback failed, or KeyboardInterrupt
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        raise
    if poll is not None:  # what arrived after the last check
        poll()
