"""Tests for monai_segdiff.metrics; expected values are computed by hand in each test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monai_segdiff.metrics import (
    ci_score,
    dice_per_label,
    expected_calibration_error,
    ged,
    hd95_per_label,
    iou,
    uncertainty_auroc,
)


def row(*values: int) -> torch.Tensor:
    """A 1 x V label map (2D) from a list of voxel labels."""
    return torch.tensor([values], dtype=torch.int64)


# --------------------------------------------------------------------------------------- Dice / HD95
def test_dice_perfect():
    target = torch.zeros(6, 6, 4, dtype=torch.int64)
    target[1:3, 1:3, 1:3] = 1
    target[4:6, 2:5, :] = 2
    assert dice_per_label(target.clone(), target, 3) == [1.0, 1.0]


def test_dice_hand_computed_and_empty_labels():
    target = row(1, 1, 1, 0, 0, 0)
    pred = row(0, 1, 1, 1, 0, 3)
    # label 1: |P|=3, |T|=3, overlap 2 -> 2*2/(3+3); label 2 absent on both sides -> 1.0;
    # label 3 only predicted -> 0.0
    dice = dice_per_label(pred, target, 4)
    assert dice[0] == pytest.approx(2 * 2 / (3 + 3))
    assert dice[1] == 1.0
    assert dice[2] == 0.0


def test_hd95_known_shift_with_spacing():
    target = torch.zeros(10, 10, dtype=torch.int64)
    pred = torch.zeros(10, 10, dtype=torch.int64)
    target[5, 1:8] = 1  # a one-voxel-thick line
    pred[2, 1:8] = 1  # the same line shifted by 3 voxels along axis 0: every distance is 3 voxels
    assert hd95_per_label(pred, target, 2) == [pytest.approx(3.0)]
    assert hd95_per_label(pred, target, 2, spacing=(1.5, 0.7)) == [pytest.approx(4.5)]


def test_hd95_3d_and_empty_labels():
    target = torch.zeros(8, 8, 8, dtype=torch.int64)
    pred = torch.zeros(8, 8, 8, dtype=torch.int64)
    target[2, 1:7, 1:7] = 1  # a plane at z=2
    pred[4, 1:7, 1:7] = 1  # the plane at z=4
    pred[6, 6, 6] = 3  # label 3 only in pred
    hd = hd95_per_label(pred, target, 4, spacing=(2.0, 1.0, 1.0))
    assert hd[0] == pytest.approx(4.0)  # 2 voxels x 2 mm
    assert hd[1] == 0.0  # label 2: empty on both sides
    assert math.isnan(hd[2])  # label 3: empty on one side


# ----------------------------------------------------------------------------------------- IoU / GED
def test_iou():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(a, a) == 1.0
    assert iou(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)) == 1.0


def test_ged_hand_computed():
    samples = [row(1, 1, 0, 0), row(1, 0, 0, 0)]
    references = [row(1, 1, 0, 0), row(0, 0, 1, 1)]
    # d(S,Y): d(S1,Y1)=0, d(S1,Y2)=1, d(S2,Y1)=1-1/2, d(S2,Y2)=1  -> mean 2.5/4
    # d(S,S'): ordered pairs incl. identical ones: 0, 1/2, 1/2, 0  -> mean 1/4
    # d(Y,Y'): 0, 1, 1, 0                                          -> mean 1/2
    expected = 2 * (2.5 / 4) - 1 / 4 - 1 / 2
    assert ged(samples, references) == pytest.approx(expected)
    assert expected == pytest.approx(0.5)


def test_ged_identical_sets_is_zero():
    masks = [row(1, 1, 0, 0), row(0, 1, 1, 0)]
    assert ged(masks, masks) == pytest.approx(0.0)


def test_ged_multiclass_averages_foreground_classes():
    sample = row(1, 1, 2, 0)
    reference = row(1, 1, 0, 0)
    # class 1: IoU 1 -> d=0; class 2: predicted only -> IoU 0, d=1; mean d = 1/2; one pair each
    assert ged([sample], [reference], num_classes=3) == pytest.approx(2 * 0.5)
    # binary view (foreground = label > 0): IoU 2/3 -> d = 1/3
    assert ged([sample], [reference]) == pytest.approx(2 * (1 / 3))


# ---------------------------------------------------------------------------------------------- CI
def test_ci_two_references():
    references = [row(1, 1, 0, 0), row(1, 0, 0, 0)]
    samples = [row(1, 0, 0, 0), row(0, 0, 1, 0)]
    # S_c: union refs {0,1}, union samples {0,2}: TP=1, FN=1
    s_c = 1 / 2
    # D_max: Y1: max(Dice(Y1,S1)=2/3, Dice(Y1,S2)=0); Y2: max(1, 0)
    d_max = (2 / 3 + 1) / 2
    # pairwise variance of the difference image, V=4 voxels:
    #   Y1-Y2 = [0,1,0,0]: E[x^2]=1/4, mean=1/4 -> 1/4 - 1/16 = 3/16
    #   S1-S2 = [1,0,-1,0]: E[x^2]=1/2, mean=0  -> 1/2
    d_a = 1 - (abs(3 / 16 - 1 / 2) + abs(3 / 16 - 1 / 2)) / 2
    ci = 3 / (1 / s_c + 1 / d_max + 1 / d_a)
    out = ci_score(samples, references)
    assert out["combined_sensitivity"] == pytest.approx(s_c)
    assert out["max_dice_matching"] == pytest.approx(d_max)
    assert out["diversity_agreement"] == pytest.approx(11 / 16)
    assert out["ci"] == pytest.approx(ci)
    json.dumps(out)


def test_ci_three_references_min_max_variance():
    references = [row(1, 1, 0, 0), row(1, 0, 0, 0), row(1, 1, 1, 1)]
    samples = [row(1, 0, 0, 0), row(0, 0, 1, 0)]
    s_c = 2 / 4  # union refs = all 4 voxels, union samples {0, 2}
    d_max = (2 / 3 + 1 + 2 / 5) / 3  # Y3 vs S1 or S2: 2*1/(4+1)
    # reference pairs: (Y1,Y2) 3/16; (Y1,Y3) diff [0,0,-1,-1]: 1/2 - 1/4 = 1/4;
    #                  (Y2,Y3) diff [0,-1,-1,-1]: 3/4 - 9/16 = 3/16  -> V_min 3/16, V_max 1/4
    # sample pair: 1/2 -> V_min = V_max = 1/2
    d_a = 1 - (abs(1 / 4 - 1 / 2) + abs(3 / 16 - 1 / 2)) / 2
    out = ci_score(samples, references)
    assert out["combined_sensitivity"] == pytest.approx(s_c)
    assert out["max_dice_matching"] == pytest.approx(d_max)
    assert out["diversity_agreement"] == pytest.approx(d_a)
    assert out["ci"] == pytest.approx(3 * s_c * d_max * d_a / (s_c * d_max + d_max * d_a + s_c * d_a))


def test_ci_perfect_and_zero():
    masks = [row(1, 1, 0, 0), row(0, 1, 1, 0)]
    assert ci_score(masks, masks) == {
        "combined_sensitivity": 1.0,
        "max_dice_matching": 1.0,
        "diversity_agreement": 1.0,
        "ci": 1.0,
    }
    missed = ci_score([row(0, 0, 0, 1)], [row(1, 0, 0, 0)])
    assert missed["combined_sensitivity"] == 0.0 and missed["ci"] == 0.0


def test_ci_multiclass_averages_components():
    references = [row(1, 2, 0, 0)]
    samples = [row(1, 0, 2, 0)]
    # class 1: S_c 1, D_max 1; class 2: S_c 0 (missed), D_max 0; D_a 1 (single masks) for both
    out = ci_score(samples, references, num_classes=3)
    assert out["combined_sensitivity"] == pytest.approx(0.5)
    assert out["max_dice_matching"] == pytest.approx(0.5)
    assert out["diversity_agreement"] == pytest.approx(1.0)
    assert out["ci"] == pytest.approx(3 / (2 + 2 + 1))


# ------------------------------------------------------------------------------------------- AUROC
def test_auroc_perfect_reversed_and_hand_case():
    error = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    assert uncertainty_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), error) == 1.0
    assert uncertainty_auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), error) == 0.0
    # pairs (error, correct): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert uncertainty_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), error) == pytest.approx(0.75)
    # a tie counts one half: 0.5 vs 0.2 -> 1, 0.5 vs 0.5 -> 1/2, 0.9 -> 2  => 3.5 / 4
    assert uncertainty_auroc(torch.tensor([0.2, 0.5, 0.5, 0.9]), error) == pytest.approx(0.875)
    assert uncertainty_auroc(torch.full((4,), 0.3), error) == pytest.approx(0.5)


def test_auroc_degenerate_and_shapes():
    u = torch.rand(4, 4, 2)
    assert math.isnan(uncertainty_auroc(u, torch.zeros(4, 4, 2, dtype=torch.bool)))
    assert math.isnan(uncertainty_auroc(u, torch.ones(4, 4, 2, dtype=torch.bool)))
    g = torch.Generator().manual_seed(0)
    big = torch.rand(200_000, generator=g)
    assert uncertainty_auroc(big.reshape(100, 2000), (big > 0.5).reshape(100, 2000)) == 1.0


# --------------------------------------------------------------------------------------------- ECE
def binary_probs(p_fg: list[float]) -> torch.Tensor:
    p = torch.tensor(p_fg)
    return torch.stack([1 - p, p])


def test_ece_calibrated_is_zero():
    probs = binary_probs([0.8] * 10)  # confidence 0.8 for class 1
    target = torch.tensor([1] * 8 + [0] * 2)  # 80% correct
    ece, diagram = expected_calibration_error(probs, target)
    assert ece == pytest.approx(0.0, abs=1e-6)
    assert sum(diagram["count"]) == 10


def test_ece_overconfident_and_diagram():
    # 4 voxels at confidence 0.95 (2 correct) and 6 at 0.65 (all correct)
    probs = binary_probs([0.95] * 4 + [0.35] * 6)
    target = torch.tensor([1, 1, 0, 0] + [0] * 6)
    ece, diagram = expected_calibration_error(probs, target, bins=10)
    assert ece == pytest.approx(0.4 * abs(0.5 - 0.95) + 0.6 * abs(1.0 - 0.65), abs=1e-6)
    assert diagram["count"] == [0, 0, 0, 0, 0, 0, 6, 0, 0, 4]
    assert diagram["accuracy"][9] == pytest.approx(0.5) and diagram["accuracy"][6] == pytest.approx(1.0)
    assert diagram["confidence"][9] == pytest.approx(0.95) and diagram["confidence"][6] == pytest.approx(0.65)
    assert diagram["accuracy"][0] is None and diagram["confidence"][0] is None
    assert len(diagram["bin_edges"]) == 11
    json.dumps(diagram)
    # a plain overconfident case: confidence 0.9, half right -> 0.4
    ece, _ = expected_calibration_error(binary_probs([0.9] * 4), torch.tensor([1, 1, 0, 0]))
    assert ece == pytest.approx(0.4, abs=1e-6)
