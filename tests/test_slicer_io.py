"""3D Slicer segmentation files: ``segdiff infer --seg-nrrd`` writes one that slicerio reads back with the
model's segment names, voxels and geometry; Slicer's own files (slicerio's samples, incl. overlapping
layers) are read by segment name; ``.seg.nrrd`` labels in a studies folder train like NIfTI labels."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import slicerio
import torch

from conftest import PHANTOMS, tiny_config
from monai_segdiff import data
from monai_segdiff.cli import main
from monai_segdiff.slicer_io import LPS_FROM_RAS, read_seg_nrrd, write_seg_nrrd

NAMES = {"background": 0, "organ": 1, "lesion": 2}


def test_infer_writes_a_slicer_segmentation_that_round_trips(tiny_model, tmp_path, one_thread):
    image = PHANTOMS / "phantom_005.nii.gz"
    assert main(["infer", "--model", str(tiny_model), "--image", str(image), "--output", str(tmp_path),
                 "--samples", "2", "--steps", "2", "--seg-nrrd", "--quiet"]) == 0
    pred = nib.load(tmp_path / "phantom_005_seg.nii.gz")  # the prediction, as NIfTI
    label = np.asarray(pred.dataobj)
    seg = slicerio.read_segmentation(str(tmp_path / "phantom_005.seg.nrrd"))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("organ", 1), ("lesion", 2)]
    assert seg["voxels"].shape == label.shape and np.array_equal(seg["voxels"], label)
    np.testing.assert_allclose(seg["ijkToLPS"], LPS_FROM_RAS @ pred.affine, atol=1e-4)
    for name, value in (("organ", 1), ("lesion", 2)):
        assert np.array_equal(slicerio.segment_mask(seg, name), label == value)
    back, affine = read_seg_nrrd(tmp_path / "phantom_005.seg.nrrd", NAMES)
    assert np.array_equal(back, label) and np.allclose(affine, pred.affine, atol=1e-4)


def test_slicer_files_are_read_by_segment_name():
    path = slicerio.get_testdata_file("Segmentation.seg.nrrd")  # written by 3D Slicer
    seg = slicerio.read_segmentation(path)
    labels, affine = read_seg_nrrd(path, {"background": 0, "left lung": 1, "ribs": 2})
    assert labels.shape == seg["voxels"].shape
    assert np.array_equal(labels == 1, slicerio.segment_mask(seg, "left lung"))
    assert np.array_equal(labels == 2, slicerio.segment_mask(seg, "ribs"))
    assert set(np.unique(labels)) == {0, 1, 2}  # the other segments are not labels of the model
    np.testing.assert_allclose(affine, LPS_FROM_RAS @ seg["ijkToLPS"])
    # without names: Slicer's own label values
    raw, _ = read_seg_nrrd(path)
    assert np.array_equal(raw, seg["voxels"])


def test_overlapping_layers_are_flattened_by_name():
    path = slicerio.get_testdata_file("SegmentationOverlapping.seg.nrrd")
    seg = slicerio.read_segmentation(path)
    assert seg["voxels"].ndim == 4  # two layers
    labels, _ = read_seg_nrrd(path, {"ribs": 1, "overlapping sphere": 2})
    sphere, ribs = slicerio.segment_mask(seg, "overlapping sphere"), slicerio.segment_mask(seg, "ribs")
    assert (sphere & ribs).any()  # they do overlap; the later label wins there
    assert np.array_equal(labels == 2, sphere) and np.array_equal(labels == 1, ribs & ~sphere)


def test_2d_label_map_round_trip(tmp_path):
    label = torch.zeros(1, 20, 30, dtype=torch.uint8)
    label[0, 2:8, 3:9], label[0, 10:15, 20:28] = 1, 2
    affine = torch.tensor([[0.5, 0.0, 10.0], [0.0, 0.7, -4.0], [0.0, 0.0, 1.0]])
    path = write_seg_nrrd(label, affine, tmp_path / "pic.seg.nrrd", NAMES)
    back, aff = read_seg_nrrd(path, NAMES)
    assert back.shape == (20, 30, 1) and np.array_equal(back[..., 0], label[0].numpy())
    np.testing.assert_allclose(aff[:2, [0, 1, 3]], affine[:2].numpy())


def test_seg_nrrd_labels_in_a_studies_folder_train_like_nifti(tmp_path):
    """Labels saved by Slicer (other label values, names as in labels.json) load as the model's labels."""
    from monai_segdiff.training import load_cases

    root = tmp_path / "studies"
    (root / "labels" / "final").mkdir(parents=True)
    for i in range(2):
        name = f"phantom_{i:03d}.nii.gz"
        shutil.copy(PHANTOMS / name, root / name)
        nifti = nib.load(PHANTOMS / "labels" / "final" / name)
        # Slicer numbers segments by creation order: lesion first here, so the file's values differ
        write_seg_nrrd(_swap(np.asarray(nifti.dataobj)), nifti.affine,
                       root / "labels" / "final" / f"phantom_{i:03d}.seg.nrrd", {"lesion": 1, "organ": 2})
    shutil.copy(PHANTOMS / "labels.json", root / "labels.json")
    items = data.labelled(data.datalist(root))
    assert [it["label"].endswith(".seg.nrrd") for it in items] == [True, True]
    cfg = tiny_config()
    from_slicer = load_cases(items, cfg)
    nifti_items = [dict(it, label=str(PHANTOMS / "labels" / "final" / f"{it['id']}.nii.gz")) for it in items]
    from_nifti = load_cases(nifti_items, cfg)
    for (img_a, lab_a), (img_b, lab_b) in zip(from_slicer, from_nifti):
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)
    # evaluate / al-simulate read reference labels on the input grid the same way
    from monai_segdiff.io import load_label

    for it in items:
        truth = np.asarray(nib.load(PHANTOMS / "labels" / "final" / f"{it['id']}.nii.gz").dataobj)
        assert np.array_equal(load_label(it["label"], cfg.label_names)[0].numpy(), truth)


def _swap(label: np.ndarray) -> np.ndarray:
    """organ 1 <-> lesion 2, so the file's values are not the model's."""
    out = np.zeros(label.shape, dtype=np.uint8)
    out[label == 1], out[label == 2] = 2, 1
    return out[None]


@pytest.mark.parametrize("names", [None, {"background": 0, "organ": 1}])
def test_empty_segmentation_reads_as_background(tmp_path, names):
    path = write_seg_nrrd(np.zeros((1, 4, 5, 6), np.uint8), np.eye(4), tmp_path / "empty.seg.nrrd", {"background": 0})
    labels, _ = read_seg_nrrd(path, names)
    assert labels.shape == (4, 5, 6) and not labels.any()
