"""monai_segdiff.training: training that cannot lie -- no score for empty vs empty, no run on empty or
out-of-set labels, validation only on labels with foreground."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_segdiff.training import check_labels, pooled_dice, split_validation
from monai_segdiff.errors import InputError


def test_empty_prediction_of_an_empty_reference_is_no_score():
    empty = torch.zeros(4, 4, dtype=torch.long)
    assert math.isnan(pooled_dice([(empty, empty), (empty, empty)], num_classes=3))
    ref = empty.clone()
    ref[0, 0] = 1
    assert pooled_dice([(empty, ref)], num_classes=3) == 0.0  # found nothing: 0, not 1
    # label 2 absent from every reference and prediction: only label 1 is averaged
    assert pooled_dice([(ref, ref), (empty, empty)], num_classes=3) == 1.0
    pred = ref.clone()
    pred[1, 1] = 2  # a false label-2 voxel counts against the model
    assert pooled_dice([(pred, ref)], num_classes=3) == pytest.approx(0.5)


def _label(path, array):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(path))
    return {"id": path.name.split(".")[0], "image": str(path), "label": str(path)}


def test_all_empty_labels_are_refused_with_the_reason(tmp_path):
    items = [_label(tmp_path / f"c{i}.nii.gz", np.zeros((8, 8, 4))) for i in range(3)]
    with pytest.raises(InputError, match="all 3 label.*empty"):
        check_labels(items, ["brain"])


def test_values_outside_the_label_set_are_refused(tmp_path):
    arr = np.zeros((8, 8, 4))
    arr[2, 2, 2] = 2
    with pytest.raises(InputError, match=r"values \[2\] outside the label set"):
        check_labels([_label(tmp_path / "c.nii.gz", arr)], ["brain"])


def test_validation_only_on_labels_with_foreground(tmp_path):
    full = np.zeros((8, 8, 4))
    full[2:5, 2:5, 1:3] = 1
    items = [_label(tmp_path / f"p{i}.nii.gz", full) for i in range(4)]
    items += [_label(tmp_path / f"n{i}.nii.gz", np.zeros((8, 8, 4))) for i in range(4)]
    foreground = check_labels(items, ["brain"])
    assert foreground == [True] * 4 + [False] * 4
    train, val = split_validation(items, foreground, 0.5)
    assert val and all(it["id"].startswith("p") for it in val)
    assert sorted(it["id"] for it in train + val) == sorted(it["id"] for it in items)
    with pytest.raises(InputError, match="1 of 5 label.*at least 2"):
        split_validation(items[3:], foreground[3:], 0.2)
