"""Tests of monai_segdiff.data and of the shipped sample data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_segdiff.data import (
    IMAGE_SUFFIXES,
    DataError,
    datalist,
    find_label,
    image_id,
    label_tags,
    labelled,
    list_images,
    rater_tags,
    split,
    unlabelled,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data"
PHANTOMS = SAMPLE / "phantoms"
CHEST = SAMPLE / "chest-ct"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture()
def studies(tmp_path: Path) -> Path:
    """A small studies folder with mixed suffixes, hidden files, raters and unlabelled images."""
    root = tmp_path / "studies"
    for name in ["b.nrrd", "a.nii.gz", "c.png", "d.mha", "e.nii", ".hidden.nii.gz", "x.seg.nrrd", "notes.txt"]:
        touch(root / name)
    (root / "subdir.nii.gz").mkdir()  # a directory is not an image
    touch(root / "labels" / "final" / "a.nii.gz")
    touch(root / "labels" / "final" / "b.nii.gz")  # label suffix differs from the image's
    touch(root / "labels" / "final" / "e.seg.nrrd")  # Slicer segmentation as label
    touch(root / "labels" / "rater2" / "a.nii.gz")
    touch(root / "labels" / "rater1" / "a.nii.gz")
    touch(root / "labels" / "rater1" / "c.png")
    touch(root / "labels" / "original" / "a.nii.gz")
    (root / "labels" / ".cache").mkdir()
    touch(root / "labels" / "rater1" / ".a.nii.gz")
    return root


# ---------------------------------------------------------------------------------------------
# the module on a synthetic folder
# ---------------------------------------------------------------------------------------------


def test_image_id_strips_known_suffixes() -> None:
    assert image_id("/x/phantom_000.nii.gz") == "phantom_000"
    assert image_id("case.nii") == "case"
    assert image_id(Path("dir/ct.NRRD")) == "ct"
    assert image_id("slice.jpeg") == "slice"
    assert image_id("label.seg.nrrd") == "label"
    assert image_id("odd.name.mha") == "odd.name"
    assert ".nii.gz" in IMAGE_SUFFIXES


def test_list_images_sorted_and_filtered(studies: Path) -> None:
    names = [p.name for p in list_images(studies)]
    assert names == ["a.nii.gz", "b.nrrd", "c.png", "d.mha", "e.nii"]


def test_tags(studies: Path) -> None:
    assert label_tags(studies) == ["final", "original", "rater1", "rater2"]
    assert rater_tags(studies) == ["rater1", "rater2"]


def test_tags_without_labels_folder(tmp_path: Path) -> None:
    touch(tmp_path / "a.nii.gz")
    assert label_tags(tmp_path) == []
    assert rater_tags(tmp_path) == []


def test_find_label(studies: Path) -> None:
    assert find_label(studies, studies / "a.nii.gz") == studies / "labels" / "final" / "a.nii.gz"
    assert find_label(studies, studies / "b.nrrd") == studies / "labels" / "final" / "b.nii.gz"
    assert find_label(studies, studies / "e.nii") == studies / "labels" / "final" / "e.seg.nrrd"
    assert find_label(studies, studies / "c.png") is None
    assert find_label(studies, studies / "c.png", "rater1") == studies / "labels" / "rater1" / "c.png"
    assert find_label(studies, studies / "a.nii.gz", "missing") is None


def test_datalist(studies: Path) -> None:
    items = datalist(studies)
    assert [i["id"] for i in items] == ["a", "b", "c", "d", "e"]
    by_id = {i["id"]: i for i in items}
    assert set(by_id["a"]) == {"id", "image", "label", "raters"}
    assert by_id["a"]["raters"] == [
        str((studies / "labels" / "rater1" / "a.nii.gz").resolve()),
        str((studies / "labels" / "rater2" / "a.nii.gz").resolve()),
    ]
    assert Path(by_id["a"]["image"]).is_absolute()
    assert set(by_id["b"]) == {"id", "image", "label"}
    assert set(by_id["c"]) == {"id", "image", "raters"}  # rater label but no final label
    assert set(by_id["d"]) == {"id", "image"}
    assert [i["id"] for i in labelled(items)] == ["a", "b", "e"]
    assert [i["id"] for i in unlabelled(items)] == ["c", "d"]

    no_raters = datalist(studies, with_raters=False)
    assert all("raters" not in i for i in no_raters)

    by_rater = {i["id"]: i for i in datalist(studies, tag="rater1")}
    assert by_rater["a"]["label"].endswith("rater1/a.nii.gz")
    assert by_rater["a"]["raters"] == [str((studies / "labels" / "rater2" / "a.nii.gz").resolve())]
    assert "label" not in by_rater["b"]


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        datalist(tmp_path / "missing")
    with pytest.raises(DataError, match="not a directory"):
        datalist(touch(tmp_path / "file.nii.gz"))
    empty = tmp_path / "empty"
    empty.mkdir()
    touch(empty / "readme.txt")
    with pytest.raises(DataError, match="no images"):
        datalist(empty)
    assert list_images(empty) == []
    with pytest.raises(ValueError):  # DataError is a ValueError
        list_images(tmp_path / "missing")


def test_split_deterministic_and_complete() -> None:
    items = [{"id": f"case_{i:02d}", "image": f"/x/case_{i:02d}.nii.gz"} for i in range(20)]
    train, val = split(items, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(i["id"] for i in train + val) == [i["id"] for i in items]
    assert split(items, 0.25, seed=3) == (train, val)
    # independent of the input order, and each part keeps the input order
    train_r, val_r = split(items[::-1], 0.25, seed=3)
    assert {i["id"] for i in val_r} == {i["id"] for i in val}
    assert [i["id"] for i in train] == sorted(i["id"] for i in train)
    assert split(items, 0.25, seed=4)[1] != val


def test_split_edge_cases() -> None:
    one = [{"id": "a"}]
    assert split(one, 0.5) == (one, [])
    assert split([], 0.5) == ([], [])
    two = [{"id": "a"}, {"id": "b"}]
    train, val = split(two, 0.01)
    assert len(train) == 1 and len(val) == 1
    train, val = split(two, 1.0)
    assert len(train) == 1 and len(val) == 1
    assert split(two, 0.0) == (two, [])
    with pytest.raises(ValueError):
        split(two, 1.5)


# ---------------------------------------------------------------------------------------------
# the shipped phantoms
# ---------------------------------------------------------------------------------------------

def load(path: str | Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantom_items() -> list[dict]:
    return datalist(PHANTOMS)


def test_phantom_datalist(phantom_items: list[dict]) -> None:
    assert len(phantom_items) == 28
    assert len(labelled(phantom_items)) == 28
    assert rater_tags(PHANTOMS) == ["rater1", "rater2", "rater3"]
    assert all(len(i["raters"]) == 3 for i in phantom_items)
    assert json.loads((PHANTOMS / "labels.json").read_text()) == {"background": 0, "organ": 1, "lesion": 2}


def test_phantom_labels_and_raters(phantom_items: list[dict]) -> None:
    with_lesion = 0
    differs = 0
    for item in phantom_items:
        image = load(item["image"])
        final_img = load(item["label"])
        final = np.asanyarray(final_img.dataobj)
        assert image.shape == (64, 64, 32) and final.shape == (64, 64, 32)
        assert final.dtype == np.uint8
        assert np.allclose(final_img.affine, image.affine)
        assert set(np.unique(final)) <= {0, 1, 2}
        assert (final == 1).sum() > 1000  # the organ is always there
        with_lesion += int((final == 2).any())
        raters = [np.asanyarray(load(p).dataobj) for p in item["raters"]]
        for rater in raters:
            assert set(np.unique(rater)) <= {0, 1, 2}
            assert dice(rater > 0, final > 0) > 0.8
            differs += int((rater != final).any())
        # final is the voxel-wise majority (median of three labels)
        assert np.array_equal(np.median(np.stack(raters), axis=0).astype(np.uint8), final)
    assert 20 <= with_lesion < 28
    assert differs == 3 * 28


def test_phantom_variety(phantom_items: list[dict]) -> None:
    codes, dtypes, spacings, maxima, minima = set(), set(), [], [], []
    for item in phantom_items:
        image = load(item["image"])
        codes.add(nib.aff2axcodes(image.affine))
        dtypes.add(image.get_data_dtype().name)
        spacings.append(image.header.get_zooms()[:3])
        data = image.get_fdata(dtype=np.float32)
        maxima.append(float(data.max()))
        minima.append(float(data.min()))
    assert ("R", "A", "S") in codes and len(codes) >= 2  # some flipped orientations
    assert {"int16", "float32"} <= dtypes
    spacings_arr = np.asarray(spacings)
    assert np.all((spacings_arr[:, :2] >= 0.8) & (spacings_arr[:, :2] <= 1.2))
    assert np.all((spacings_arr[:, 2] >= 1.5) & (spacings_arr[:, 2] <= 3.0))
    assert min(minima) < -50  # CT-like values
    assert max(maxima) > 500  # MRI-like arbitrary units


def test_phantom_world_space_consistent(phantom_items: list[dict]) -> None:
    """Flipped cases store flipped arrays: the organ centre lies near the volume centre in world space."""
    for item in phantom_items:
        label = load(item["label"])
        organ = np.argwhere(np.asanyarray(label.dataobj) == 1).mean(axis=0)
        centre = (np.asarray(label.shape) - 1) / 2.0
        world = nib.affines.apply_affine(label.affine, organ) - nib.affines.apply_affine(label.affine, centre)
        assert np.all(np.abs(world) < 0.3 * np.asarray(label.header.get_zooms()) * np.asarray(label.shape))


def test_phantom_generator_reproduces_shipped_cases(tmp_path: Path) -> None:
    out = tmp_path / "regen"
    subprocess.run(
        [sys.executable, str(SAMPLE / "generate_phantoms.py"), "--output", str(out), "--count", "2"],
        check=True,
        capture_output=True,
    )
    assert [p.name for p in list_images(out)] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    for name in ("phantom_000.nii.gz", "phantom_001.nii.gz"):
        for rel in [name] + [f"labels/{tag}/{name}" for tag in ("final", "rater1", "rater2", "rater3")]:
            new, old = load(out / rel), load(PHANTOMS / rel)
            assert np.array_equal(np.asanyarray(new.dataobj), np.asanyarray(old.dataobj)), rel
            assert np.array_equal(new.affine, old.affine), rel
            assert new.get_data_dtype() == old.get_data_dtype(), rel


def test_phantom_generator_hard_rate_sets_the_share_of_hard_cases() -> None:
    """``--hard-rate`` changes only cases beyond the shipped schedule: 0 gives none hard, 1 all kinds."""
    sys.path.insert(0, str(SAMPLE))
    try:
        import generate_phantoms as gp
    finally:
        sys.path.remove(str(SAMPLE))

    def spec(index: int, rate: float):
        return gp.case_spec(index, np.random.default_rng([7, index]), rate)

    assert spec(1, 0.0).hard == spec(1, 1.0).hard == ("low_contrast",)  # the shipped schedule holds
    beyond = range(gp.DEFAULT_COUNT, gp.DEFAULT_COUNT + 40)
    assert all(spec(i, 0.0).hard == () for i in beyond)
    assert all(spec(i, 1.0).hard == gp.HARD_KINDS for i in beyond)
    default = sum(bool(spec(i, gp.HARD_RATE).hard) for i in beyond)
    assert 0 < default < 40
    # outliers: only beyond the schedule, only with a rate, and every other case stays identical
    assert gp.OUTLIER not in gp.make_case(1, 7, outlier_rate=1.0)[2].hard
    plain, corrupt = gp.make_case(30, 7), gp.make_case(30, 7, outlier_rate=1.0)
    assert corrupt[2].hard == (*plain[2].hard, gp.OUTLIER)
    assert np.array_equal(np.asanyarray(plain[1]["final"].dataobj), np.asanyarray(corrupt[1]["final"].dataobj))
    noise = [float(np.std(np.diff(np.asanyarray(c[0].dataobj).astype(float), axis=0))) for c in (plain, corrupt)]
    assert noise[1] > 2 * noise[0]  # the failed acquisition is far noisier
    assert np.array_equal(np.asanyarray(gp.make_case(31, 7, outlier_rate=0.0)[0].dataobj),
                          np.asanyarray(gp.make_case(31, 7)[0].dataobj))


def test_sample_data_size_budget() -> None:
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# the chest CT
# ---------------------------------------------------------------------------------------------


def test_chest_ct() -> None:
    items = datalist(CHEST)
    assert [i["id"] for i in items] == ["chest_ct"]
    image, label = load(items[0]["image"]), load(items[0]["label"])
    assert image.shape == label.shape
    assert np.allclose(image.affine, label.affine, atol=1e-4)
    assert image.get_data_dtype() == np.int16
    assert label.get_data_dtype() == np.uint8
    names = json.loads((CHEST / "labels.json").read_text())
    values = set(np.unique(np.asanyarray(label.dataobj)).tolist())
    assert values == set(names.values())
    assert names.get("background") == 0
    hu = np.asanyarray(image.dataobj)
    assert hu.min() <= -900 and hu.max() >= 300  # air and bone in Hounsfield units


def test_phantom_raters_disagree_more_on_low_contrast_lesions() -> None:
    cases = json.loads((PHANTOMS / "cases.json").read_text())["cases"]
    scores: dict[bool, list[float]] = {True: [], False: []}
    for case in cases:
        if not case["lesion"]:
            continue
        final = np.asanyarray(load(PHANTOMS / "labels" / "final" / f"{case['name']}.nii.gz").dataobj) == 2
        for tag in ("rater1", "rater2", "rater3"):
            rater = np.asanyarray(load(PHANTOMS / "labels" / tag / f"{case['name']}.nii.gz").dataobj) == 2
            scores["low_contrast" in case["hard"]].append(dice(rater, final))
    assert scores[True] and np.mean(scores[True]) < np.mean(scores[False]) - 0.05


def test_patch_sampler_augmentation_keeps_image_and_label_aligned() -> None:
    """Flips move image and label together; intensity changes touch the image only; one seed replays."""
    import torch

    from monai_segdiff.config import AUGMENT_OPTIONS, SegDiffConfig
    from monai_segdiff.transforms import AUGMENTATIONS, PatchSampler

    assert tuple(AUGMENTATIONS) == AUGMENT_OPTIONS  # every option the config accepts has a builder, in order
    gen = torch.Generator().manual_seed(0)
    label = (torch.rand(1, 40, 36, 12, generator=gen) > 0.7).float()
    image = label * 2 - 1  # the image is the label: any misaligned flip would show
    flip_only = PatchSampler([(image, label)], SegDiffConfig(roi_size=[32, 32], augment=["flip"]), seed=3)
    plain = PatchSampler([(image, label)], SegDiffConfig(roi_size=[32, 32], augment=[]), seed=3)
    x, y = flip_only.sample(64)
    assert torch.equal(x[:, 1:2], y * 2 - 1)  # centre slice of the 2.5D context vs its label
    assert not torch.equal(x, plain.sample(64)[0])  # some samples were flipped

    full = SegDiffConfig(roi_size=[32, 32])
    assert full.augment == ["flip", "intensity", "noise"]
    x1, y1 = PatchSampler([(image, label)], full, seed=5).sample(64)
    x2, y2 = PatchSampler([(image, label)], full, seed=5).sample(64)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.unique().tolist()) <= {0.0, 1.0}  # labels stay labels
    assert not torch.equal(x1.abs().amax(dim=(1, 2, 3)), torch.ones(64))  # intensities were changed
    with pytest.raises(ValueError, match="augment"):
        SegDiffConfig(augment=["rotate"])
