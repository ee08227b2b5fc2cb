"""``segdiff export-bundle``: the MONAI Bundle it writes is run by ``python -m monai.bundle run`` (a real
subprocess) and segments an image with the diffusion sampler, on the image's own grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicerio
import torch

from conftest import PHANTOMS
from monai_segdiff.cli import main
from monai_segdiff.config import load_checkpoint


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "segdiff_tiny"
    assert main(["export-bundle", "--model", str(tiny_model), "--output", str(out), "--name", "segdiff_tiny"]) == 0
    return out


def test_bundle_layout_and_metadata(bundle, tiny_model):
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["name"] == "segdiff_tiny" and meta["version"] and meta["monai_version"]
    # MONAI Label reads the label names of a bundle from the prediction's channel_def
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert {"network_def", "segmenter", "run", "dataset_dir", "output_dir"} <= set(inference)
    state, cfg, _ = load_checkpoint(bundle / "models" / "model.pt")
    state0, cfg0, _ = load_checkpoint(tiny_model)
    assert cfg == cfg0 and state.keys() == state0.keys()
    assert all(torch.equal(state[k], state0[k]) for k in state)


@pytest.mark.slow
def test_monai_bundle_run_segments_an_image_with_the_sampler(bundle, tiny_model, tmp_path, one_thread):
    image = PHANTOMS / "phantom_005.nii.gz"  # axes flipped: the output must keep the input's affine
    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
         "--dataset_dir", str(image), "--output_dir", str(out), "--num_samples", "2", "--steps", "2",
         "--seg_nrrd", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = nib.load(image)
    seg = nib.load(out / "phantom_005_seg.nii.gz")
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
    label = np.asarray(seg.dataobj)
    assert set(np.unique(label)) <= {0, 1, 2}
    assert nib.load(out / "phantom_005_uncertainty.nii.gz").shape == src.shape
    stats = json.loads((out / "phantom_005.json").read_text())
    assert stats["samples"] == 2 and stats["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
    # the same ensemble as segdiff's own Segmenter with these settings (seed 0): the diffusion sampler ran
    from monai_segdiff.segmenter import Segmenter

    ref = Segmenter.from_checkpoint(tiny_model, num_samples=2, steps=2, seed=0)(str(image))
    assert np.mean(label == ref.label[0].numpy()) > 0.999
    np.testing.assert_allclose(np.asarray(nib.load(out / "phantom_005_uncertainty.nii.gz").dataobj),
                               ref.uncertainty[0].numpy(), atol=1e-3)
    slicer = slicerio.read_segmentation(str(out / "phantom_005.seg.nrrd"))
    assert [s["name"] for s in slicer["segments"]] == ["organ", "lesion"]
    assert np.array_equal(slicer["voxels"], label)


def test_export_errors_are_one_line(tiny_model, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("x")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        "missing checkpoint": ["--model", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "b1")],
        "not a checkpoint": ["--model", str(a_file), "--output", str(tmp_path / "b2")],
        "non-empty output": ["--model", str(tiny_model), "--output", str(taken)],
        "output is a file": ["--model", str(tiny_model), "--output", str(a_file)],
    }
    for what, args in cases.items():
        assert main(["export-bundle", *args]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("segdiff export-bundle: error: "), (what, err)
    assert sorted(p.name for p in taken.iterdir()) == ["something.txt"]
    assert not (tmp_path / "b1").exists() and not list(tmp_path.glob(".b*"))  # nothing half-written left
