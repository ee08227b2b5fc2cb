"""monai_segdiff.labelstore, and the app's datastore that wires it: a submitted label keeps every
foreground voxel under its segment's name, the byte-exact upload and the replaced version are kept,
unnamed values and an empty label over a non-empty one are refused with their reasons."""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOMS, app_module
from fastapi import HTTPException

from monai_segdiff import labelstore as store
from monai_segdiff.labelset import LabelSet
from monai_segdiff.errors import InputError
from monai_segdiff.validation import check_image_file

SegDiffLocalDatastore = app_module("lib.localstore").SegDiffLocalDatastore


def studies_with_image(dest):
    dest.mkdir(parents=True)
    shutil.copy(PHANTOMS / "phantom_000.nii.gz", dest / "case.nii.gz")
    return dest


def label_file(path, image, values):
    """A label on the image's grid with a cube of each value."""
    img = nib.load(str(image))
    arr = np.zeros(img.shape, np.uint8)
    for i, v in enumerate(values):
        arr[10 + 12 * i: 18 + 12 * i, 10:18, 5:9] = v
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))
    return path, arr


def test_names_values_and_answer(tmp_path):
    studies = studies_with_image(tmp_path / "s")
    path, arr = label_file(tmp_path / "up.nii.gz", studies / "case.nii.gz", [1, 2])
    image = check_image_file(studies / "case.nii.gz", channels=None)
    names = store.submitted_names({"label_info": [{"name": "Brain", "idx": 1}, {"name": "uncertain", "idx": 2}]}, path)
    assert names == ["Brain", "uncertain"]
    assert store.check_submission(path, image, names)["values"] == [1, 2]
    with pytest.raises(InputError, match=r"label values \[2\] are not named by label_info \(1 segment\(s\): Brain\)"):
        store.check_submission(path, image, ["Brain"])
    assert store.bootstrap_names({"values": [1, 3]}, []) == ["label1", "label2", "label3"]


def test_datastore_keeps_every_voxel_the_upload_and_the_replaced_label(tmp_path):
    studies = studies_with_image(tmp_path / "s")
    ds = SegDiffLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    up, arr = label_file(tmp_path / "up.nii.gz", studies / "case.nii.gz", [1, 2])
    info = {"label_info": [{"name": "ventricles", "idx": 1}, {"name": "brain", "idx": 2}]}
    ds.save_label("case", str(up), "final", info)
    answer = ds.get_label_info("case", "final")["segdiff"]
    assert answer["label_set"] == {"background": 0, "ventricles": 1, "brain": 2} and answer["segments"] == {
        "ventricles": 1, "brain": 2}
    stored = np.asarray(nib.load(ds.get_label_uri("case", "final")).dataobj)
    assert np.array_equal(stored, arr)
    kept = studies / answer["upload_kept"]
    assert hashlib.sha256(kept.read_bytes()).digest() == hashlib.sha256(up.read_bytes()).digest()
    assert json.loads(kept.with_name(kept.name + ".json").read_text())["label_info"] == info

    # the same structures in the other order, with other case: same values, the first version kept
    up2, arr2 = label_file(tmp_path / "up2.nii.gz", studies / "case.nii.gz", [1, 2])
    ds.save_label("case", str(up2), "final", {"label_info": [{"name": "BRAIN"}, {"name": "Ventricles"}]})
    stored = np.asarray(nib.load(ds.get_label_uri("case", "final")).dataobj)
    assert np.array_equal(stored, np.where(arr2 == 1, 2, np.where(arr2 == 2, 1, 0)))
    assert LabelSet.load(studies).to_dict() == {"background": 0, "ventricles": 1, "brain": 2}
    replaced = np.asarray(nib.load(str(studies / ".segdiff" / "replaced" / "final" / "case.nii.gz")).dataobj)
    assert np.array_equal(replaced, arr)

    empty, _ = label_file(tmp_path / "empty.nii.gz", studies / "case.nii.gz", [])
    with pytest.raises(HTTPException) as e:
        ds.save_label("case", str(empty), "final", {"label_info": [{"name": "brain"}]})
    assert e.value.status_code == 409 and "is empty and would replace a non-empty one" in e.value.detail
    with pytest.raises(HTTPException) as e:
        ds.save_label("case", str(up), "final", {"label_info": [{"name": "brain"}]})
    assert e.value.status_code == 422 and "label values [2] are not named" in e.value.detail
    ds.save_label("case", str(up), "final", {})  # no names, values in the set: stored as they are
    stored = np.asarray(nib.load(ds.get_label_uri("case", "final")).dataobj)
    assert np.array_equal(stored, arr) and not list((studies / ".segdiff").glob(".staged-*"))
