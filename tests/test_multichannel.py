"""Multi-channel (multi-modal) images: one file per channel (nnU-Net naming + ``channels.json``) or one
4D NIfTI, the synthetic multi-modal set, and a tiny model trained with ``segdiff train`` that needs every
channel (dropping one is a clear error; blanking one lowers Dice)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO

from monai_segdiff import data, metrics
from monai_segdiff.cli import main
from monai_segdiff.config import load_checkpoint
from monai_segdiff.errors import InputError
from monai_segdiff.io import load_image, load_label
from monai_segdiff.segmenter import Segmenter

MULTI = REPO / "sample-data" / "multimodal"
CHANNELS = ["flair", "t1ce", "t2"]


def nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def files(case: str) -> list[str]:
    return [str(MULTI / f"{case}_{c:04d}.nii.gz") for c in range(len(CHANNELS))]


# --------------------------------------------------------------------------------------------------
# the studies-folder convention
# --------------------------------------------------------------------------------------------------
def test_channel_files_group_into_cases_only_when_declared(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "labels" / "final").mkdir(parents=True)
    for case in ("a", "b"):
        for c in range(3):
            nifti(tmp_path / f"{case}_{c:04d}.nii.gz", rng.random((8, 8, 4)).astype(np.float32))
    nifti(tmp_path / "labels" / "final" / "a.nii.gz", np.zeros((8, 8, 4), np.uint8))
    assert [it["id"] for it in data.datalist(tmp_path)] == [f"{k}_{c:04d}" for k in "ab" for c in range(3)]

    (tmp_path / "channels.json").write_text(json.dumps(CHANNELS))
    items = data.datalist(tmp_path)
    assert [it["id"] for it in items] == ["a", "b"]
    assert items[0]["image"] == [str((tmp_path / f"a_{c:04d}.nii.gz").resolve()) for c in range(3)]
    assert items[0]["label"].endswith("labels/final/a.nii.gz") and "label" not in items[1]
    assert data.channel_names(tmp_path) == CHANNELS and data.case_id(items[0]["image"]) == "a"
    (tmp_path / "channels.json").write_text(json.dumps({"0": "flair", "1": "t1ce", "2": "t2"}))  # nnU-Net form
    assert data.channel_names(tmp_path) == CHANNELS

    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(data.DataError, match=r"case 'b'.*3 channels.*missing file\(s\) b_\{0001\}"):
        data.datalist(tmp_path)


def test_4d_nifti_equals_the_per_channel_files(tmp_path):
    """Both layouts give the same ``[C, X, Y, Z]`` image, channels in order."""
    case = files("mm_000")
    stacked = np.stack([np.asarray(nib.load(f).dataobj) for f in case], axis=-1)  # X x Y x Z x C
    four_d = nifti(tmp_path / "mm_000.nii.gz", stacked, nib.load(case[0]).affine)
    a, b = load_image(case), load_image(four_d)
    assert tuple(a.shape) == (3, 48, 48, 20) and torch.equal(a, b)
    assert np.allclose(a.affine, b.affine)
    with pytest.raises(InputError, match="image not found"):
        load_image([*case[:2], str(tmp_path / "nope.nii.gz")])


# --------------------------------------------------------------------------------------------------
# the sample set
# --------------------------------------------------------------------------------------------------
def test_multimodal_sample_set_each_channel_shows_its_own_part(tmp_path):
    items = data.labelled(data.datalist(MULTI))
    assert len(items) == 12 and data.channel_names(MULTI) == CHANNELS
    cases = json.loads((MULTI / "cases.json").read_text())["cases"]
    from importlib import util

    spec = util.spec_from_file_location("make_multimodal", REPO / "sample-data" / "make_multimodal.py")
    gen = util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for it, case in zip(items[:4], cases):
        channels, label, parts, _ = gen.make_case(case["index"])
        assert np.array_equal(label, np.asarray(nib.load(it["label"]).dataobj))
        shipped = [np.asarray(nib.load(f).dataobj).astype(np.float64) for f in it["image"]]
        assert all(np.array_equal(x, y) for x, y in zip(channels, shipped))
        tissue = [float(np.median(ch[(label == 0) & (ch > 0.7 * t)])) for ch, t in zip(shipped, gen.TISSUE)]
        for k in range(3):  # the core of part k: bright in channel k, like tissue in the others
            core = parts == k + 1
            assert core.sum() > 20
            ratios = [float(np.median(shipped[c][core])) / tissue[c] for c in range(3)]
            assert ratios[k] > 1.3 and all(0.85 < r < 1.15 for c, r in enumerate(ratios) if c != k), (k, ratios)
    subprocess.run([sys.executable, str(REPO / "sample-data" / "make_multimodal.py"), "--output", str(tmp_path),
                    "--count", "1"], check=True, capture_output=True)
    for rel in ("mm_000_0002.nii.gz", "labels/final/mm_000.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(tmp_path / rel).dataobj), np.asarray(nib.load(MULTI / rel).dataobj))


# --------------------------------------------------------------------------------------------------
# a model that needs every channel
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split():
    items = data.labelled(data.datalist(MULTI))
    return items[:9], items[9:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, split, one_thread) -> Path:
    root = tmp_path_factory.mktemp("multimodal")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in ("labels.json", "channels.json"):
        shutil.copy(MULTI / name, studies)
    for it in split[0]:
        for f in it["image"]:
            shutil.copy(f, studies)
        shutil.copy(it["label"], studies / "labels" / "final")
    out = root / "mm.pt"
    assert main(["train", "--studies", str(studies), "--output", str(out), "--network", "concat",
                 "--channels", "16,16,32", "--context", "0", "--epochs", "4", "--iterations-per-epoch", "30",
                 "--batch-size", "8", "--lr", "2e-3", "--val-split", "0", "--steps", "2", "--samples", "3",
                 "--quiet"]) == 0
    return out


def held_out_dice(seg: Segmenter, items: list[dict], blank: int | None = None) -> float:
    scores = []
    for it in items:
        img = load_image(it["image"])
        if blank is not None:  # a missing sequence filled with zeros
            img = img.clone()
            img[blank] = 0
        pred = seg(img)
        scores.append(float(metrics.dice_per_label(pred.label[0].long(), load_label(it["label"])[0].long(), 2)[0]))
    return float(np.mean(scores))


@pytest.mark.slow
def test_training_uses_every_channel(trained, split):
    _, cfg, _ = load_checkpoint(trained)
    assert (cfg.image_channels, cfg.image_dims, cfg.in_channels) == (3, 3, 3)
    seg = Segmenter.from_checkpoint(trained, num_samples=3, steps=2)
    full = held_out_dice(seg, split[1])
    blanked = [held_out_dice(seg, split[1], blank=c) for c in range(3)]
    print(f"\nheld-out Dice: all channels {full:.3f}; channel blanked: "
          + ", ".join(f"{n} {d:.3f}" for n, d in zip(CHANNELS, blanked)))
    assert full > 0.55
    assert all(d < full - 0.1 for d in blanked), (full, blanked)


@pytest.mark.slow
def test_dropping_a_channel_is_a_clear_error(trained, split, tmp_path):
    case = split[1][0]["image"]
    seg = Segmenter.from_checkpoint(trained, num_samples=1, steps=1)
    with pytest.raises(InputError, match=r"expects 3 image channel\(s\), the image has 2"):
        seg(case[:2])
    two = np.stack([np.asarray(nib.load(f).dataobj) for f in case[:2]], axis=-1)
    with pytest.raises(InputError, match=r"expects 3 image channel\(s\), the image has 2"):
        seg(nifti(tmp_path / "two.nii.gz", two))

    proc = subprocess.run([sys.executable, "-m", "monai_segdiff.cli", "infer", "--model", str(trained), "--image",
                           *case[:2], "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == ["segdiff infer: error: the model expects 3 image channel(s), the image has 2 "
                      "(give every channel: a multi-channel file, or one file per channel)"], proc.stderr

    # every channel: the outputs are named after the case, on the input grid
    assert main(["infer", "--model", str(trained), "--image", *case, "--output", str(tmp_path / "ok"),
                 "--samples", "2", "--steps", "1", "--quiet"]) == 0
    name = split[1][0]["id"]
    seg_img = nib.load(tmp_path / "ok" / f"{name}_seg.nii.gz")
    assert seg_img.shape == (48, 48, 20) and np.allclose(seg_img.affine, nib.load(case[0]).affine)
    assert json.loads((tmp_path / "ok" / f"{name}.json").read_text())["image"] == case
