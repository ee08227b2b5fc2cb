"""The real development set (``sample-data/make_real_dev.py``) builds from the package cache into valid
studies folders: every case labelled, every structure present, labels on the image grid, real structure
names. Skipped unless the cache already holds the source packages: the test never downloads (run the
script once, or point ``MONAI_SEGDIFF_REAL_CACHE`` at a cache). No training.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from monai_segdiff import data

PHANTOM_NAMES = {"organ", "lesion"}  # the shipped phantom model's labels


def make_real_dev() -> ModuleType:
    """``sample-data/make_real_dev.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("make_real_dev", REPO / "sample-data" / "make_real_dev.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_same_grid(image: sitk.Image, label: sitk.Image, where: str) -> None:
    assert image.GetSize() == label.GetSize(), where
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(label, get)(), getattr(image, get)(), rtol=0, atol=1e-5, err_msg=where)


def test_real_dev_set_builds_from_cache(tmp_path):
    real = make_real_dev()
    missing = real.missing_packages(real.DEFAULT_CACHE)
    if missing:
        pytest.skip(f"package cache {real.DEFAULT_CACHE} lacks {', '.join(missing)} (the test never downloads; "
                    "run sample-data/make_real_dev.py once to fill it)")

    real.build(tmp_path, real.DEFAULT_CACHE, download=False)

    for task in real.TASKS:
        folder = tmp_path / task.name
        labels = json.loads((folder / "labels.json").read_text())
        assert labels == task.labels() and labels["background"] == 0
        assert not PHANTOM_NAMES & set(labels), f"{task.name}: {labels}"
        assert (folder / "SOURCE.md").is_file()

        items = data.datalist(folder)
        assert sorted(item["id"] for item in data.labelled(items)) == sorted(case.name for case in task.cases)
        assert not data.unlabelled(items)
        for item in items:
            image, label = sitk.ReadImage(item["image"]), sitk.ReadImage(item["label"])
            where = f"{task.name}/{item['id']}"
            assert_same_grid(image, label, where)
            assert label.GetPixelID() == sitk.sitkUInt8, where
            values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
            assert values == set(labels.values()), f"{where}: label values {values}, expected every structure"
