"""Partial labels (issue 26): the record of annotated slices, their way through orientation and
resampling, a trainer that learns only from them, and the slice-selection rules against hand picks."""

from __future__ import annotations

import json
import random
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_segdiff import data
from monai_segdiff.config import SegDiffConfig
from monai_segdiff.errors import DataError, InputError
from monai_segdiff.selection import (
    foreground_slices,
    input_slice_scores,
    random_slices,
    slice_axis,
    uncertain_slices,
)
from monai_segdiff.training import load_cases, pooled_dice, train
from monai_segdiff.transforms import UNANNOTATED, PatchSampler


def _case(folder, name, image, label, affine=None):
    affine = np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / f"{name}.nii.gz"))
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(folder / "labels" / "final" / f"{name}.nii.gz"))


def _cfg(**kw) -> SegDiffConfig:
    base = dict(labels=["organ"], network="medsegdiff", spatial_dims=2, context=0, roi_size=[16, 16],
                channels=[8, 16], attention_levels=[False, False], norm_num_groups=4, spacing=[1.0, 1.0, 2.0],
                intensity="ct", ct_window=[0.0, 20.0], augment=[], foreground_fraction=0.5)
    base.update(kw)
    return SegDiffConfig(**base)


def test_the_record_is_read_checked_written_atomically_and_attached_to_the_datalist(tmp_path):
    img, lab = np.zeros((8, 8, 6)), np.zeros((8, 8, 6))
    _case(tmp_path, "a", img, lab)
    _case(tmp_path, "b", img, lab)
    assert data.annotated_slices(tmp_path) == {}
    data.record_annotated_slices(tmp_path, "a", 2, [4, 1, 4])
    assert json.loads((tmp_path / "labels" / "final" / data.ANNOTATED_FILE).read_text()) == {"a": {"axis": 2, "slices": [1, 4]}}
    items = {it["id"]: it for it in data.datalist(tmp_path)}
    assert items["a"]["annotated"] == {"axis": 2, "slices": [1, 4]} and "annotated" not in items["b"]
    assert not [p for p in (tmp_path / "labels" / "final").iterdir() if p.name.startswith(".")]  # no temporary left
    data.record_annotated_slices(tmp_path, "a", 2, None)
    assert data.annotated_slices(tmp_path) == {}
    for bad in ({"axis": 3, "slices": [1]}, {"axis": 0, "slices": []}, {"axis": 0, "slices": [-1]}, [1, 2]):
        (tmp_path / "labels" / "final" / data.ANNOTATED_FILE).write_text(json.dumps({"a": bad}))
        with pytest.raises(DataError, match="entry of 'a'"):
            data.datalist(tmp_path)


def test_unannotated_voxels_are_marked_after_orientation_and_resampling(tmp_path):
    """Slices recorded along the image array's axis 0 of a volume stored with S on its first axis (as
    real scans can be) arrive as whole z-planes after RAS orientation; a slice where the annotator drew
    a structure outside the record counts as annotated; every other voxel is UNANNOTATED."""
    image = np.random.default_rng(0).random((6, 10, 12)) * 20
    label = np.zeros((6, 10, 12))
    label[2, 3:7, 3:7] = 1  # drawn on a recorded slice
    label[4, 2:5, 2:5] = 1  # drawn on a slice outside the record
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])  # array axis 0 runs along S
    _case(tmp_path, "a", image, label, affine)
    item = dict(data.datalist(tmp_path)[0], annotated={"axis": 0, "slices": [0, 2]})
    assert slice_axis(affine) == 0
    (img, lab), = load_cases([item], _cfg())
    assert lab.shape[1:] == (12, 10, 6)  # RAS: the S axis last
    annotated = [z for z in range(6) if not bool((lab[..., z] == UNANNOTATED).any())]
    assert annotated == [0, 2, 4]
    assert bool((lab[..., [1, 3, 5]] == UNANNOTATED).all())
    assert int((lab[..., 2] == 1).sum()) == 16 and int((lab[..., 4] == 1).sum()) == 9
    (_, full), = load_cases([dict(item, annotated=None)], _cfg())  # without the record: all annotated
    assert not bool((full == UNANNOTATED).any())
    with pytest.raises(InputError, match="outside the label's 6 slices"):
        load_cases([dict(item, annotated={"axis": 0, "slices": [6]})], _cfg())


def test_unannotated_slices_never_reach_the_loss(tmp_path):
    """The image's intensity is its slice index, so every training sample tells which slice it came from:
    with the record, only the annotated slices are ever sampled (the only way into the loss); without it
    the others are (the check can fail). A 3D model refuses a partial label with the reason."""
    z = np.broadcast_to(np.arange(10, dtype=np.float32), (16, 16, 10))
    label = np.zeros((16, 16, 10))
    label[4:12, 4:12, 3] = 1
    _case(tmp_path, "a", z, label, np.eye(4))
    item = dict(data.datalist(tmp_path)[0], annotated={"axis": 2, "slices": [3, 7]})
    cfg = _cfg(spacing=[1.0, 1.0, 1.0], intensity="ct", ct_window=[0.0, 9.0])
    cases = load_cases([item], cfg)
    sampler = PatchSampler(cases, cfg, seed=0)
    assert sampler.num_slices() == 2
    seen = set()
    for _ in range(40):
        image, lab = sampler.sample(8)
        assert not bool((lab == UNANNOTATED).any())
        seen |= {round(float(v) * 9) for v in (image.flatten(1).amax(1) + 1) / 2}
    assert seen == {3, 7}
    whole = PatchSampler(load_cases([dict(item, annotated=None)], cfg), cfg, seed=0)
    seen_whole = set()
    for _ in range(40):
        image, _ = whole.sample(8)
        seen_whole |= {round(float(v) * 9) for v in (image.flatten(1).amax(1) + 1) / 2}
    assert len(seen_whole) > 5
    with pytest.raises(InputError, match="partial label"):
        PatchSampler(cases, cfg.replace(spatial_dims=3, roi_size=[16, 16, 8]), seed=0)


def test_a_model_learns_from_partial_labels_and_validation_scores_only_annotated_voxels(tmp_path):
    """Four training cases annotated on 3 of 16 slices each (background elsewhere unannotated) teach a
    tiny model the structure well enough on a fully annotated case it never saw."""
    rng = np.random.default_rng(1)
    for i in range(5):
        image = rng.normal(0, 1, (24, 24, 16))
        label = np.zeros((24, 24, 16))
        x, y = rng.integers(6, 12, 2)
        label[x:x + 8, y:y + 8, 3:13] = 1
        image[label > 0] += 6
        _case(tmp_path, f"c{i}", image * 2 + 10, label, np.eye(4))
    items = data.datalist(tmp_path)
    for it in items[:4]:
        it["annotated"] = {"axis": 2, "slices": [1, 7, 12]}
    cfg = _cfg(spacing=[1.0, 1.0, 1.0], roi_size=[24, 24], channels=[16, 32], anchor_share=0.0,
               intensity="ct", ct_window=[-5.0, 40.0])
    result = train(cfg, items[:4], items[4:], output=tmp_path / "m.pt", epochs=6, iterations_per_epoch=25,
                   batch_size=8, seed=0)
    assert result.best_dice > 0.7, result.val_dice
    # the validation Dice of a partial reference ignores its unannotated voxels
    ref = torch.tensor([1, 1, UNANNOTATED, UNANNOTATED, 0])
    assert pooled_dice([(torch.tensor([1, 1, 1, 1, 0]), ref)], 2) == 1.0
    assert pooled_dice([(torch.tensor([1, 0, 1, 1, 0]), ref)], 2) == pytest.approx(2 / 3)


def test_slice_scores_land_on_the_input_slices_nearest_resampling_copies():
    """A 2 mm working grid over a 1 mm input: working slice k is input slice 2k (what nearest resampling
    copies into it); with S on the input's first axis the scores are per slice of that axis."""
    work = np.zeros((4, 4, 5))
    work[..., 3] = 0.8
    work[..., 1] = 0.5
    axis, scores = input_slice_scores(work, np.diag([1.0, 1.0, 2.0, 1.0]), np.eye(4), (4, 4, 10))
    assert axis == 2 and scores == {0: 0.0, 2: 0.5, 4: 0.0, 6: 0.8, 8: 0.0}
    s_first = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    axis, scores = input_slice_scores(work, np.diag([1.0, 1.0, 2.0, 1.0]), s_first, (10, 4, 4))
    assert axis == 0 and scores[6] == 0.8 and scores[2] == 0.5


def test_slice_picks_by_hand():
    scores = {0: 0.1, 1: 0.9, 2: 0.85, 3: 0.2, 4: 0.7, 5: 0.7, 9: 0.3}
    assert uncertain_slices(scores, 3) == [1, 4, 9]  # 2 is next to 1, 5 next to 4 (ties: lower index first)
    assert uncertain_slices(scores, 3, min_gap=1) == [1, 2, 4]
    assert uncertain_slices({0: 1.0, 1: 0.5}, 3) == [0]  # no more slices far enough apart
    assert random_slices(range(10), 3, random.Random(4)) == sorted(random.Random(4).sample(list(range(10)), 3))
    picks = foreground_slices(range(20), {5, 6}, 3, random.Random(0))  # a third of 3: one among {5, 6}
    assert len(picks) == 3 and len(set(picks) & {5, 6}) >= 1
    assert set(foreground_slices(range(20), {5, 6}, 6, random.Random(0), share=1.0)) >= {5, 6}
    assert foreground_slices(range(4), set(), 2, random.Random(0)) == random_slices(range(4), 2, random.Random(0))


def test_round_picks_of_partial_annotation_by_hand():
    """One round of ``al-simulate --unit slices``: the uncertainty rule ranks cases by the mean of their
    most uncertain slices and hands out those slices; the random rules draw cases, then slices."""
    from monai_segdiff.al_simulation import _pick_slices
    from monai_segdiff.selection import case_slices

    scores = {
        "a": {0: 0.9, 1: 0.9, 2: 0.1, 3: 0.1},  # best two apart: 0 and 2 -> mean 0.5
        "b": {0: 0.6, 1: 0.1, 2: 0.6, 3: 0.1},  # 0 and 2 -> mean 0.6
        "c": {0: 0.2, 1: 0.3, 2: 0.2, 3: 0.4},  # 1 and 3 -> mean 0.35
    }
    assert case_slices(scores["a"], 2) == ([0, 2], pytest.approx(0.5))
    assert case_slices({}, 2) == ([], 0.0)
    axes = {i: (2, [0, 1, 2, 3]) for i in scores}
    picks = _pick_slices("segdiff_uncertainty", ["c", "a", "b"], 2, 2, random.Random(0), axes, None, scores, 1 / 3)
    assert picks == {"b": [0, 2], "a": [0, 2]}
    rng_cases = random.Random(5).sample(["a", "b", "c"], 2)
    picks = _pick_slices("random", ["c", "b", "a"], 2, 2, random.Random(5), axes, None, None, 1 / 3)
    assert list(picks) == rng_cases and all(len(v) == 2 and set(v) <= {0, 1, 2, 3} for v in picks.values())
    fg = {"a": {3}, "b": {3}, "c": {3}}
    picks = _pick_slices("fg_random", ["a", "b", "c"], 3, 2, random.Random(1), axes, fg, None, 1 / 3)
    assert set(picks) == {"a", "b", "c"} and all(3 in v and len(v) == 2 for v in picks.values())


def test_the_record_reaches_a_monai_label_datalist(tmp_path):
    """The app's trainer gets MONAI Label's datalist (no ``annotated``): ``with_annotated`` attaches the
    record to labelled items only."""
    _case(tmp_path, "a", np.zeros((8, 8, 6)), np.zeros((8, 8, 6)))
    data.record_annotated_slices(tmp_path, "a", 2, [1, 3])
    items = [{"id": "a", "image": "a.nii.gz", "label": "la.nii.gz"}, {"id": "b", "image": "b.nii.gz", "label": "lb"},
             {"id": "a", "image": "a.nii.gz"}]
    out = data.with_annotated(items, tmp_path)
    assert out[0]["annotated"] == {"axis": 2, "slices": [1, 3]}
    assert "annotated" not in out[1] and "annotated" not in out[2]
    assert "annotated" not in items[0]  # the caller's items are left as they were


def test_the_slices_strategy_hands_out_the_most_uncertain_slices_and_shares_reservations(tmp_path):
    """``segdiff_slices`` on a real MONAI Label datastore: the image whose most uncertain slices are most
    uncertain, those slices with their S positions, the request kept in the image info; the two
    strategies never hand one image to two annotators."""
    from conftest import app_module
    from monailabel.datastore.local import LocalDatastore

    act = app_module("lib.activelearning")
    slices_key = app_module("lib.scoring.uncertainty").SLICES_KEY
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[:3, 3] = [0.0, 0.0, -10.0]
    for name in ("x", "y", "z"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 8), np.float32), affine), str(tmp_path / f"{name}.nii.gz"))
    store = LocalDatastore(str(tmp_path), extensions=["*.nii.gz"], auto_reload=False)
    shared = act.Reservations(60)
    s = act.SlicesStrategy(slices=2, reservations=shared, seed=0)
    u = act.UncertaintyStrategy(reservations=shared)
    first = s({"client_id": "a"}, store)
    assert first["annotate"] is None and first["id"] in {"x", "y", "z"}  # no slice scores yet: whole image
    for name, per_slice in {"x": [0.1, 0.9, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0],  # 1 and 3: 0.85
                            "y": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.95],  # 7 and 0: 0.725
                            "z": [0.0] * 8}.items():
        store.update_image_info(name, {slices_key: {"axis": 2, "slices": list(range(8)), "scores": per_slice},
                                       "segdiff_uncertainty": 1.0 if name == "z" else 0.1})
    got = s({"client_id": "b"}, store)
    best = "y" if first["id"] == "x" else "x"
    assert got["id"] == best, got
    want = [1, 3] if best == "x" else [0, 7]
    assert got["annotate"]["axis"] == 2 and got["annotate"]["slices"] == want
    assert got["annotate"]["positions_mm"] == [-10.0 + 2.5 * j for j in want]  # S of the slice centres (RAS = LPS's S)
    request = store.get_image_info(best)[act.ANNOTATE_KEY]
    assert {k: request[k] for k in ("axis", "slices")} == {"axis": 2, "slices": want} and request["until"] > time.time()
    assert u({"client_id": "c"}, store)["id"] not in {first["id"], best}  # shared: a's and b's images are taken
    assert s({"client_id": "d"}, store) is None  # all three are with annotators a, b, c
    assert set(s.reserved()) == set(u.reserved()) == {"x", "y", "z"}
    # b asks the whole-image strategy next: b's image is released, and what u hands out carries no request
    whole = u({"client_id": "b"}, store)["id"]
    assert whole == best and not store.get_image_info(best).get(act.ANNOTATE_KEY)
    # the default strategy: random among the free images, with the same reservations
    r = act.FreeRandomStrategy(reservations=shared, seed=0)
    assert r({"client_id": "e"}, store) is None  # a, b and c hold all three
    shared.by_client.clear()  # a, b and c are done
    picks = {r({"client_id": c}, store)["id"] for c in ("e", "f", "g")}
    assert picks == {"x", "y", "z"}  # e, f and g each get their own image, in random order


def test_a_label_is_partial_only_while_its_request_is_live(tmp_path):
    """What the app's datastore records when a final label is submitted: the slices of a live
    ``segdiff_slices`` request; an expired request is ignored; an earlier record stays (and is said)."""
    from conftest import app_module

    partial = app_module("lib.localstore").SegDiffLocalDatastore._partial
    _case(tmp_path, "a", np.zeros((8, 8, 6)), np.zeros((8, 8, 6)))
    assert partial(str(tmp_path), "a", {"axis": 2, "slices": [1, 3], "until": time.time() - 1}) is None
    assert partial(str(tmp_path), "a", None) is None and data.annotated_slices(tmp_path) == {}
    got = partial(str(tmp_path), "a", {"axis": 2, "slices": [1, 3], "until": time.time() + 60})
    assert got["slices"] == [1, 3] and "unannotated" in got["note"]
    assert data.annotated_slices(tmp_path) == {"a": {"axis": 2, "slices": [1, 3]}}
    again = partial(str(tmp_path), "a", None)  # resubmitted later without a request: still partial, and said so
    assert again["slices"] == [1, 3] and "recorded earlier" in again["note"]


def test_slice_positions_follow_the_header_of_a_permuted_flipped_scan(tmp_path):
    """Real scans come in any orientation: with S on the array's first axis, running head to foot, the S
    position Slicer shows for each handed-out slice is the header's (as nibabel computes it)."""
    from conftest import app_module

    positions = app_module("lib.activelearning.slices")._positions
    affine = np.array([[0, 0, -0.8, 40.0], [0, 0.8, 0, -12.0], [-2.5, 0, 0, 95.0], [0, 0, 0, 1]])  # S = 95 - 2.5 i
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 9), np.float32), affine), str(tmp_path / "scan.nii.gz"))
    assert slice_axis(affine) == 0

    class Store:
        def get_image_uri(self, image_id):
            return str(tmp_path / f"{image_id}.nii.gz")

    got = positions(Store(), "scan", 0, [0, 4, 11])
    want = [float((affine @ [j, 4.5, 4, 1])[2]) for j in (0, 4, 11)]
    assert got == pytest.approx(want, abs=0.01) and got[0] > got[-1]
