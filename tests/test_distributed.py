"""Multi-process training with torch DDP on CPU (gloo backend, 2 spawned processes): one step's gradients
are the mean of the ranks' gradients, every rank trains on its own batches, rank 0 alone validates,
reports and writes the checkpoint; and the app's train task runs this path for ``multi_gpu`` / ``gpus``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from conftest import PHANTOMS, app_module, make_studies, tiny_config
from monai_segdiff import distributed

WORLD = 2


def _batch(rank: int, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A batch of this rank's own (random image, mask, noise) -- different on every rank."""
    g = torch.Generator().manual_seed(100 + rank)
    image = torch.randn(2, cfg.in_channels, 32, 32, generator=g)
    label = torch.randint(0, cfg.num_classes, (2, 1, 32, 32), generator=g)
    return image, label, torch.Generator().manual_seed(200 + rank)


def _gradients(model: torch.nn.Module, net: torch.nn.Module, image, label) -> list[torch.Tensor]:
    model(image, label).backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def _rank(rank: int, device: str, out: str, items: list[dict]) -> None:
    """One spawned rank: (1) a DDP gradient on this rank's batch, (2) a short ``train`` run."""
    from monai_segdiff.diffusion.objective import DiffusionObjective
    from monai_segdiff.networks import build_network
    from monai_segdiff.training import step_loss, train

    torch.set_num_threads(1)
    cfg = tiny_config(roi_size=[32, 32])
    torch.manual_seed(0)
    net = build_network(cfg)
    image, label, gen = _batch(rank, cfg)
    loss = functools.partial(step_loss, cfg=cfg, objective=DiffusionObjective(cfg), generator=gen)
    model = distributed.wrap(net, loss)
    torch.save({"ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel), "world": distributed.world_size(),
                "grads": _gradients(model, net, image, label)}, Path(out) / f"grads{rank}.pt")

    calls: list[dict] = []
    result = train(cfg, items[:2], items[2:3], output=Path(out) / f"model{rank}.pt", epochs=2,
                   iterations_per_epoch=2, batch_size=2, val_samples=1, device=device, callback=calls.append)
    (Path(out) / f"result{rank}.json").write_text(json.dumps(
        {"steps": result.steps, "losses": result.losses, "val_dice": result.val_dice, "callbacks": len(calls)}))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    from monai_segdiff import data

    out = tmp_path_factory.mktemp("ddp")
    items = data.labelled(data.datalist(PHANTOMS))[:3]
    distributed.launch(_rank, ["cpu"] * WORLD, str(out), items)
    return out


@pytest.mark.slow
def test_gradients_are_averaged_over_the_ranks(ddp_run, one_thread):
    """Each rank's DDP gradient equals the mean of the single-process gradients of both ranks' batches."""
    from monai_segdiff.diffusion.objective import DiffusionObjective
    from monai_segdiff.networks import build_network
    from monai_segdiff.training import step_loss

    cfg = tiny_config(roi_size=[32, 32])
    local = []
    for rank in range(WORLD):
        torch.manual_seed(0)
        net = build_network(cfg)
        image, label, gen = _batch(rank, cfg)
        loss = functools.partial(step_loss, cfg=cfg, objective=DiffusionObjective(cfg), generator=gen)
        model = distributed.wrap(net, loss)
        assert not isinstance(model, torch.nn.parallel.DistributedDataParallel)  # no process group here
        local.append(_gradients(model, net, image, label))
    mean = [(a + b) / 2 for a, b in zip(*local)]
    assert any(not torch.allclose(a, b) for a, b in zip(*local))  # the ranks' batches really differ
    for rank in range(WORLD):
        saved = torch.load(ddp_run / f"grads{rank}.pt", weights_only=True)
        assert saved["ddp"] and saved["world"] == WORLD
        for got, want in zip(saved["grads"], mean):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_every_rank_trains_and_rank0_alone_validates_reports_and_saves(ddp_run):
    results = [json.loads((ddp_run / f"result{r}.json").read_text()) for r in range(WORLD)]
    assert [r["steps"] for r in results] == [4, 4]
    assert results[0]["losses"] != results[1]["losses"]  # own batches per rank
    assert len(results[0]["val_dice"]) == 2 and results[1]["val_dice"] == []
    assert results[0]["callbacks"] == 2 and results[1]["callbacks"] == 0
    assert (ddp_run / "model0.pt").is_file() and not (ddp_run / "model1.pt").exists()
    payload = torch.load(ddp_run / "model0.pt", weights_only=True)
    assert payload["config"]["labels"] == ["organ", "lesion"]


def test_rank_devices_follow_monai_label_options(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert distributed.rank_devices(False, "0,1", "cpu") == ["cpu"]
    assert distributed.rank_devices(True, "0,1", "cpu") == ["cpu", "cpu"]  # no CUDA: one CPU process per id
    assert distributed.rank_devices(True, "1", "cpu") == ["cpu"]
    assert distributed.rank_devices(True, "all", "cpu") == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # how MONAI Label's task runner passes gpus "0,1"
    assert distributed.rank_devices(True, "all", "cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="gpus"):
        distributed.rank_devices(True, "first,second", "cpu")


@pytest.mark.slow
def test_app_trainer_multi_gpu_runs_two_processes(tmp_path, monkeypatch):
    """``segdiff_train`` with ``multi_gpu`` and ``gpus="0,1"`` on a CPU machine, as MONAI Label's task
    runner hands it over (``gpus`` "all", the ids in ``CUDA_VISIBLE_DEVICES``): DDP on 2 processes,
    rank 0's progress reaches train_stats.json in the trainer's process, the model is published."""
    from monailabel.datastore.local import LocalDatastore
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    SegDiffTrain = app_module("lib.trainers.segdiff").SegDiffTrain
    studies, _ = make_studies(tmp_path / "studies", unlabeled=24)  # 4 labelled: 3 train, 1 validation
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    model = tmp_path / "model" / "segdiff.pt"
    model.parent.mkdir()
    task = SegDiffTrain(str(model), str(studies), network="concat", device="cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    stats = task({"multi_gpu": True, "gpus": "all", "device": "cpu", "max_epochs": 1, "max_minutes": 0,
                  "iterations_per_epoch": 2, "train_batch_size": 2, "pretrained": False, "tracking": "tensorboard"},
                 datastore)
    assert stats["status"] == "DONE" and stats["world_size"] == 2 and stats["rank_steps"] == [2, 2]
    assert stats["published"] and model.is_file()
    progress = json.loads((model.parent / "train_stats.json").read_text())
    assert progress["epoch"] == 1 and progress["world_size"] == 2
    runs = list((model.parent / "runs").iterdir())  # TensorBoard, from rank 0's stats
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert {"train/loss", "train/lr", "val/dice"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1]
