"""The ``segdiff`` command line: real training and inference on the phantoms, and one-line errors."""

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

from monai_segdiff.cli import main

PHANTOMS = Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai_segdiff.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def small_studies(tmp_path_factory) -> Path:
    """Six phantoms with labels (and their raters)."""
    root = tmp_path_factory.mktemp("studies")
    for tag in ("final", "rater1"):
        (root / "labels" / tag).mkdir(parents=True)
    for i in range(6):
        name = f"phantom_{i:03d}.nii.gz"
        shutil.copy(PHANTOMS / name, root / name)
        for tag in ("final", "rater1"):
            shutil.copy(PHANTOMS / "labels" / tag / name, root / "labels" / tag / name)
    shutil.copy(PHANTOMS / "labels.json", root / "labels.json")
    return root


@pytest.fixture(scope="module")
def trained(small_studies, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m.pt"
    rc = main(["train", "--studies", str(small_studies), "--output", str(out), "--epochs", "1",
               "--iterations-per-epoch", "5", "--batch-size", "4", "--channels", "8,16,16", "--quiet"])
    assert rc == 0 and out.is_file()
    return out


def test_train_writes_our_checkpoint(trained):
    payload = torch.load(trained, weights_only=True)
    assert payload["config"]["labels"] == ["organ", "lesion"]
    assert payload["config"]["network"] == "medsegdiff"


def test_infer_writes_outputs_on_the_input_grid(trained, tmp_path):
    image = PHANTOMS / "phantom_005.nii.gz"  # a flipped-axes case
    rc = main(["infer", "--model", str(trained), "--image", str(image), "--output", str(tmp_path),
               "--samples", "2", "--steps", "2", "--quiet"])
    assert rc == 0
    src = nib.load(image)
    seg = nib.load(tmp_path / "phantom_005_seg.nii.gz")
    unc = nib.load(tmp_path / "phantom_005_uncertainty.nii.gz")
    assert seg.shape == src.shape and unc.shape == src.shape
    assert np.allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(seg.get_fdata())) <= {0.0, 1.0, 2.0}
    stats = json.loads((tmp_path / "phantom_005.json").read_text())
    assert stats["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
    assert set(stats["labels"]) == {"organ", "lesion"} and "total_s" in stats["timings"]


def test_infer_same_seed_same_result(trained, tmp_path):
    image = PHANTOMS / "phantom_001.nii.gz"
    for sub in ("a", "b"):
        assert main(["infer", "--model", str(trained), "--image", str(image), "--output", str(tmp_path / sub),
                     "--samples", "2", "--steps", "2", "--seed", "3", "--quiet"]) == 0
    a = nib.load(tmp_path / "a" / "phantom_001_uncertainty.nii.gz").get_fdata()
    b = nib.load(tmp_path / "b" / "phantom_001_uncertainty.nii.gz").get_fdata()
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_errors_are_one_line_and_nonzero(trained, tmp_path, capsys):
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(PHANTOMS / "phantom_000.nii.gz", empty / "phantom_000.nii.gz")
    cases = {
        "missing file": ["infer", "--model", str(trained), "--image", str(tmp_path / "nope.nii.gz"), "--output", str(tmp_path)],
        "unreadable image": ["infer", "--model", str(trained), "--image", str(tmp_path / "broken.nii.gz"), "--output", str(tmp_path)],
        "not our checkpoint": ["infer", "--model", str(foreign), "--image", str(PHANTOMS / "phantom_000.nii.gz"), "--output", str(tmp_path)],
        "no labels": ["train", "--studies", str(empty), "--output", str(tmp_path / "x.pt"), "--epochs", "1"],
        "no studies": ["train", "--studies", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pt")],
        "bad samples": ["infer", "--model", str(trained), "--image", str(PHANTOMS / "phantom_000.nii.gz"), "--output", str(tmp_path), "--samples", "0"],
    }
    # the console script itself once (a fresh interpreter: no traceback reaches the shell) ...
    proc = run(*cases.pop("missing file"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.strip().splitlines() if "error" in ln][-1].startswith("segdiff "), proc.stderr
    # ... the other cases through the same main() in this process (an escaping exception fails the test)
    for what, args in cases.items():
        capsys.readouterr()
        try:
            rc = main(args)
        except SystemExit as e:  # argparse's own refusals
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (what, err)
        lines = [ln for ln in err.strip().splitlines() if "error" in ln]
        assert lines and lines[-1].startswith("segdiff "), (what, err)
