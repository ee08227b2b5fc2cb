"""TensorBoard: ``segdiff train`` writes event files with the per-epoch loss, validation Dice and
learning rate (read back with TensorBoard's own ``EventAccumulator``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import labelled_phantoms
from monai_segdiff.cli import main
from monai_segdiff.tracking import TensorBoardCallback


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    return labelled_phantoms(tmp_path_factory.mktemp("studies"), 3)


def test_cli_train_writes_loss_dice_and_lr(studies, tmp_path, capsys, one_thread):
    out = tmp_path / "models" / "tiny.pt"
    rc = main(["train", "--studies", str(studies), "--output", str(out), "--network", "concat", "--channels", "8,16,16",
               "--roi-size", "32,32", "--epochs", "2", "--iterations-per-epoch", "2", "--batch-size", "2",
               "--samples", "1", "--steps", "1", "--lr", "0.002", "--quiet"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    runs = list((out.parent / "runs").glob("tiny-*"))  # default: <output folder>/runs/<name>-<time>
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))
    got = scalars(runs[0])
    assert {"train/loss", "train/lr", "val/dice"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2]  # one point per epoch
    assert [v for _, v in got["train/loss"]] == pytest.approx(result["losses"], rel=1e-5)
    assert [v for _, v in got["val/dice"]] == pytest.approx(result["val_dice"], rel=1e-5, abs=1e-6)
    assert all(math.isclose(v, 0.002, rel_tol=1e-6) for _, v in got["train/lr"])  # no warm-up from scratch


def test_callback_skips_missing_validation_and_chains(tmp_path):
    seen = []
    with TensorBoardCallback(tmp_path / "run", then=seen.append) as writer:
        writer({"epoch": 1, "loss": 0.5, "val_dice": float("nan"), "lr": 1e-3})
        writer({"epoch": 2, "loss": 0.25, "val_dice": 0.75, "lr": 1e-3})
    got = scalars(tmp_path / "run")
    assert got["train/loss"] == [(1, 0.5), (2, 0.25)] and got["val/dice"] == [(2, 0.75)]
    assert [s["epoch"] for s in seen] == [1, 2]


def test_tensorboard_none_writes_nothing(tmp_path):
    from monai_segdiff.cli import _tensorboard

    assert _tensorboard({"tensorboard": "none", "output": str(tmp_path / "m.pt"), "quiet": True}) is None
    assert not (tmp_path / "runs").exists()
