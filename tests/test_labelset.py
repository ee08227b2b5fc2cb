"""monai_segdiff.labelset: the studies' label set -- names keep their values, new names extend it,
nothing submitted becomes background except the `uncertain` segment, and label files are stored with
every foreground voxel."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from monai_segdiff.errors import InputError
from monai_segdiff.labelset import LABELS_FILE, LabelSet, extend_label_set, label_names, remap_values, write_label


def test_new_names_extend_the_set_and_values_are_stable_across_saves(tmp_path):
    labels, mapping = extend_label_set(tmp_path, ["Brain"])
    assert labels.to_dict() == {"background": 0, "Brain": 1} and mapping.added == {"Brain": 1}
    # another annotator: other order, other case, one more name and the uncertainty model's segment
    labels, mapping = extend_label_set(tmp_path, ["ventricles", "uncertain", "brain"])
    assert mapping.values == {1: 2, 2: 0, 3: 1}
    assert mapping.added == {"ventricles": 2} and mapping.dropped == {"uncertain": 2}
    assert json.loads((tmp_path / LABELS_FILE).read_text()) == {"background": 0, "Brain": 1, "ventricles": 2}
    # a restart reads the same set
    assert LabelSet.load(tmp_path) == labels and label_names(tmp_path) == ["Brain", "ventricles"]
    _, again = extend_label_set(tmp_path, ["BRAIN"])
    assert again.values == {1: 1} and not again.added


def test_a_folder_without_labels_json_starts_from_its_stored_values(tmp_path):
    labels, mapping = extend_label_set(tmp_path, ["tumor"], bootstrap=["label1", "label2"])
    assert labels.foreground == ["label1", "label2", "tumor"] and mapping.values == {1: 3}


@pytest.mark.parametrize("bad", [{"a": 1, "b": 3}, {"a": 1, "A": 2}, {"a": 1, "b": 1}])
def test_a_broken_labels_json_is_a_clear_error(tmp_path, bad):
    (tmp_path / LABELS_FILE).write_text(json.dumps(bad))
    with pytest.raises(InputError):
        LabelSet.load(tmp_path)


def test_remap_values_keeps_unmapped_values_and_widens_when_needed():
    arr = np.array([[0, 1], [2, 3]], np.uint8)
    np.testing.assert_array_equal(remap_values(arr, {1: 3, 3: 1}), [[0, 3], [2, 1]])
    assert remap_values(arr, {1: 300}).dtype == np.uint16
    np.testing.assert_array_equal(remap_values(0 * arr, {}), 0 * arr)


def test_write_label_keeps_every_foreground_voxel_and_the_grid(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4, (12, 10, 8)).astype(np.uint8)
    affine = np.diag([-0.8, 1.2, 3.0, 1.0])
    affine[:3, 3] = [10, -5, 2]
    src = tmp_path / "upload.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine), str(src))
    dest = tmp_path / "stored.nii.gz"
    write_label(src, dest, {1: 2, 2: 1, 3: 5}, tmp_path)
    out = nib.load(str(dest))
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    got = np.asarray(out.dataobj)
    assert ((got > 0) == (arr > 0)).all()
    np.testing.assert_array_equal(got[arr == 3], 5)
    np.testing.assert_array_equal(got[arr == 1], 2)
