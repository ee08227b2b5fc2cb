"""monai_segdiff.retrain: the one retraining policy of the app's Train and ``segdiff train --update`` --
options checked once, fine-tune only a model made for the studies' labels, publish only what beats the
current model on foreground, keep a replaced model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import labelled_phantoms

from monai_segdiff import data
from monai_segdiff.cli import main
from monai_segdiff.labelset import label_names
from monai_segdiff.retrain import Publisher, RetrainOptions, choose_start
from monai_segdiff.errors import InputError


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_options_from_a_train_request():
    opts = RetrainOptions.from_request({"max_epochs": "3", "max_minutes": 0, "val_split": "0.25",
                                        "train_batch_size": 4.0, "learning_rate": "5e-4",
                                        "iterations_per_epoch": 0, "pretrained": "false", "network": "concat",
                                        "click_channels": "true"})
    assert opts.click_channels is True and RetrainOptions().click_channels is False
    assert (opts.epochs, opts.max_minutes, opts.val_split, opts.batch_size, opts.lr) == (3, None, 0.25, 4, 5e-4)
    assert opts.iterations_per_epoch is None and opts.pretrained is False and opts.network == "concat"
    defaults = RetrainOptions(epochs=None, max_minutes=5.0)
    assert RetrainOptions.from_request({"max_epochs": "", "network": None}, defaults) == defaults
    assert RetrainOptions.from_request({"max_epochs": 0, "max_minutes": 0}).epochs == 10  # no limit at all: 10


@pytest.mark.parametrize("request_, words", [
    ({"max_epochs": -1}, "max_epochs must be a number >= 0, got -1"),
    ({"learning_rate": 0}, "learning_rate must be a number > 0"),
    ({"val_split": 0.95}, "val_split must be a number >= 0 and <= 0.9"),
    ({"train_batch_size": "many"}, "train_batch_size must be a number >= 1, got 'many'"),
    ({"network": "nope"}, "unknown network 'nope'"),
    ({"pretrained": "perhaps"}, "pretrained must be true or false"),
    ({"click_channels": "sometimes"}, "click_channels must be true or false"),
])
def test_bad_options_are_refused_with_the_option_named(request_, words):
    with pytest.raises(InputError, match=words):
        RetrainOptions.from_request(request_)


def test_start_fine_tunes_only_a_model_for_the_studies_labels(tiny_model, tmp_path):
    studies = labelled_phantoms(tmp_path / "s", 4)
    items = data.labelled(data.datalist(studies))
    fits = choose_start(tiny_model, items, label_names(studies, items), RetrainOptions())
    assert fits.init == "pretrained" and fits.state is not None and fits.reason is None
    other = choose_start(tiny_model, items, ["brain"], RetrainOptions(network="concat"))
    assert other.init == "scratch" and other.state is None and other.config.labels == ["brain"]
    assert "labels ['brain'] differ from the model's ['organ', 'lesion']" in other.reason
    off = choose_start(tiny_model, items, ["organ", "lesion"], RetrainOptions(pretrained=False, network="concat"))
    assert off.init == "scratch" and off.reason == "pretrained is off"
    assert not off.config.click_channels  # a new model learns from simulated clicks only when asked
    clicks = choose_start(tiny_model, items, ["organ"], RetrainOptions(click_channels=True))
    assert clicks.init == "scratch" and clicks.config.click_channels and clicks.config.guidance_channels == 2
    broken = tmp_path / "broken.pt"
    broken.write_bytes(open(tiny_model, "rb").read()[:1000])
    unreadable = choose_start(broken, items, ["organ", "lesion"], RetrainOptions(network="concat"))
    assert unreadable.init == "scratch" and "cannot be read" in unreadable.reason


def test_publisher_publishes_only_a_new_best_above_the_baseline(tmp_path):
    candidate, target = tmp_path / ".m.pt.candidate", tmp_path / "m.pt"
    target.write_bytes(b"served model")
    pub = Publisher(candidate, target, baseline=0.6)
    assert not pub({"epoch": 1, "best_dice": 0.9})  # the run saved nothing yet
    candidate.write_bytes(b"epoch 2")
    assert not pub({"epoch": 2, "best_dice": 0.55}) and target.read_bytes() == b"served model"
    assert "did not beat the current model's 0.6000" in pub.note(0.55, validated=True)
    os.utime(candidate, ns=(1, 1))
    candidate.write_bytes(b"epoch 3")
    assert pub({"epoch": 3, "best_dice": 0.7}) and target.read_bytes() == b"epoch 3"
    assert pub.published and pub.note(0.7, True) is None and not (tmp_path / "replaced").exists()

    new = Publisher(candidate, target, baseline=None, keep_existing=True)  # a model for another label set
    candidate.write_bytes(b"new model, empty")
    assert not new({"epoch": 1, "best_dice": 0.0}) and target.read_bytes() == b"epoch 3"
    assert "Dice 0" in new.note(0.0, True)
    os.utime(candidate, ns=(2, 2))
    candidate.write_bytes(b"new model")
    assert new({"epoch": 2, "best_dice": 0.4}) and target.read_bytes() == b"new model"
    assert new.kept is not None and new.kept.read_bytes() == b"epoch 3"  # the replaced model is kept


def test_cli_update_fine_tunes_and_writes_only_a_better_model(tiny_model, tmp_path, capsys, one_thread):
    studies = labelled_phantoms(tmp_path / "s", 8)
    out = tmp_path / "updated.pt"
    rc = main(["train", "--studies", str(studies), "--output", str(out), "--update", str(tiny_model), "--epochs", "1",
               "--iterations-per-epoch", "4", "--batch-size", "4", "--val-split", "0.25", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["init"] == "pretrained" and report["baseline_dice"] is not None
    assert report["published"] == (report["best_dice"] > report["baseline_dice"]) == out.is_file()
    assert not (tmp_path / ".updated.pt.candidate").exists()


def test_cli_update_trains_a_new_model_for_new_labels_and_never_publishes_an_empty_one(tiny_model, tmp_path, capsys,
                                                                                       one_thread):
    studies = labelled_phantoms(tmp_path / "s", 6)
    (studies / "labels.json").write_text(json.dumps({"background": 0, "liver": 1, "tumour": 2}))
    served = tmp_path / "served.pt"
    shutil.copy(tiny_model, served)
    before = sha(served)
    torch.manual_seed(0)
    rc = main(["train", "--studies", str(studies), "--output", str(served), "--update", str(served), "--network",
               "concat", "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["init"] == "scratch" and "differ from the model's" in report["reason"]
    if report["published"]:  # one iteration rarely finds a label; if it did, the served model was kept
        assert report["best_dice"] > 0 and report["kept"] and sha(report["kept"]) == before
    else:
        assert sha(served) == before and "Dice 0" in report["note"]


def test_cli_update_refuses_init_and_empty_labels(tiny_model, tmp_path, capsys):
    studies = labelled_phantoms(tmp_path / "s", 2)
    args = ["train", "--studies", str(studies), "--output", str(tmp_path / "o.pt"), "--update", str(tiny_model)]
    assert main(args + ["--init", str(tiny_model)]) != 0
    assert "do not combine it with --init" in capsys.readouterr().err
    for label in (studies / "labels" / "final").glob("*.nii.gz"):
        img = nib.load(str(label))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(label))
    assert main(args) != 0
    assert "empty" in capsys.readouterr().err and not (tmp_path / "o.pt").exists()
