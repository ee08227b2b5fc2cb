"""Tests for monai_segdiff.uncertainty on small hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monai_segdiff.uncertainty import (
    case_score,
    disagreement,
    fuse,
    label_statistics,
    mutual_information,
    predictive_entropy,
    sample_variance,
    uncertainty_map,
)


def one_hot_mean(samples: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean one-hot over members, [K, *spatial] (test helper: the probs of hard members)."""
    return torch.stack([(samples == c).float().mean(0) for c in range(num_classes)])


# Three voxels, four members: all background / all foreground / split 2-2.
SPLIT = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.uint8)


def test_entropy_zero_where_agree_one_where_split():
    probs = one_hot_mean(SPLIT, 2)
    h = predictive_entropy(probs)
    assert h.shape == (3,)
    assert h[0].item() == 0.0 and h[1].item() == 0.0
    assert h[2].item() == pytest.approx(1.0)
    assert predictive_entropy(probs, normalise=False)[2].item() == pytest.approx(math.log(2))


def test_entropy_uniform_multiclass_is_one():
    probs = torch.full((3, 2, 2), 1.0 / 3.0)
    assert torch.allclose(predictive_entropy(probs), torch.ones(2, 2))


def test_mutual_information():
    probs = one_hot_mean(SPLIT, 2)
    # hard members: each member's own entropy is 0
    mi = mutual_information(probs, torch.zeros(3))
    assert mi[0].item() == 0.0 and mi[1].item() == 0.0
    assert mi[2].item() == pytest.approx(1.0)
    # every member equally unsure (p = 0.5 each): all aleatoric, no epistemic part
    half = torch.full((2, 3), 0.5)
    assert torch.allclose(mutual_information(half, torch.full((3,), math.log(2))), torch.zeros(3), atol=1e-6)
    # numerically negative differences are clamped to 0
    assert mutual_information(half, torch.full((3,), math.log(2) + 1e-3)).min().item() == 0.0


def test_sample_variance_binary_and_multiclass():
    v = sample_variance(SPLIT, 2)
    assert v[0].item() == 0.0 and v[1].item() == 0.0
    assert v[2].item() == pytest.approx(0.25)  # f = 1/2: (1/4 + 1/4) / 2
    one_of_four = torch.tensor([[0], [0], [0], [1]])
    assert sample_variance(one_of_four, 2)[0].item() == pytest.approx(0.75 * 0.25)
    three_way = torch.tensor([[0], [1], [2]])
    assert sample_variance(three_way, 3)[0].item() == pytest.approx(2.0 / 9.0)  # 3 x (1/3)(2/3) / 3


def test_disagreement():
    d = disagreement(SPLIT)
    assert d.tolist() == [0.0, 0.0, 0.5]
    assert disagreement(torch.tensor([[0], [1], [2]]))[0].item() == pytest.approx(2.0 / 3.0)
    assert disagreement(torch.tensor([[0], [0], [0], [1]]))[0].item() == pytest.approx(0.25)


def test_uncertainty_map_dispatch():
    probs = one_hot_mean(SPLIT, 2)
    assert torch.equal(uncertainty_map("entropy", probs, SPLIT), predictive_entropy(probs))
    assert torch.equal(uncertainty_map("variance", probs, SPLIT), sample_variance(SPLIT, 2))
    assert torch.equal(uncertainty_map("disagreement", probs, SPLIT), disagreement(SPLIT))
    mi = uncertainty_map("mutual_information", probs, SPLIT, torch.zeros(3))
    assert torch.allclose(mi, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="expected_entropy"):
        uncertainty_map("mutual_information", probs, SPLIT)
    with pytest.raises(ValueError, match="disagreement"):
        uncertainty_map("nonsense", probs, SPLIT)


def test_uncertainty_3d_shapes_and_dtypes():
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 3, (5, 8, 8, 4), generator=g, dtype=torch.int64).to(torch.uint8)
    probs = one_hot_mean(samples, 3)
    for kind in ("entropy", "variance", "disagreement"):
        u = uncertainty_map(kind, probs, samples)
        assert u.shape == (8, 8, 4) and u.dtype == torch.float32
        assert 0.0 <= u.min().item() and u.max().item() <= 1.0


def two_member_object(scale: int, size: int = 24) -> torch.Tensor:
    """Member 0 labels a (2s x 2s) square, member 1 the (2s x 4s) rectangle containing it."""
    samples = torch.zeros(2, size, size, dtype=torch.uint8)
    samples[0, : 2 * scale, : 2 * scale] = 1
    samples[1, : 2 * scale, : 4 * scale] = 1
    return samples


def test_case_score_is_size_normalised():
    small, big = two_member_object(1), two_member_object(3)
    u_small, u_big = disagreement(small), disagreement(big)
    # same pattern: half of the candidate region is split 1-1 (disagreement 0.5) -> mean 0.25
    assert case_score(u_small, samples=small) == pytest.approx(0.25)
    assert case_score(u_big, samples=big) == pytest.approx(0.25)
    # whereas the summed uncertainty grows with the object (9x here)
    assert u_big.sum().item() == pytest.approx(9 * u_small.sum().item())


def test_case_score_is_class_balanced():
    """A small, uncertain lesion weighs as much as a large, confident organ: the score is the mean of
    the per-class means (0.5 * (0.1 + 0.9)), not the pooled voxel mean (about 0.1)."""
    samples = torch.zeros(2, 20, 20, dtype=torch.uint8)
    samples[:, :18, :18] = 1  # organ: 324 voxels
    samples[0, 0, 0] = 2  # lesion: 1 voxel, one member
    u = torch.full((20, 20), 0.1)
    u[0, 0] = 0.9
    assert case_score(u, samples=samples) == pytest.approx(0.5, abs=0.005)
    probs = torch.stack([(samples == c).float().mean(0) for c in range(3)])
    assert case_score(u, probs=probs) == pytest.approx(0.5, abs=0.005)


def test_case_score_regions():
    empty = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert case_score(torch.rand(4, 4), samples=empty) == 0.0
    probs = torch.zeros(2, 4, 4)
    probs[0] = 1.0
    probs[:, 0, 0] = 0.5  # the only voxel with background probability < 0.99
    u = torch.zeros(4, 4)
    u[0, 0] = 0.8
    u[3, 3] = 0.9  # outside the region: ignored
    assert case_score(u, probs=probs) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        case_score(u)


def test_label_statistics():
    samples = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    samples[:, :2, :2, :2] = 1  # both members: 8 voxels of label 1
    samples[1, 2, :2, :2] = 1  # member 1 adds 4 voxels
    label = torch.zeros(4, 4, 4, dtype=torch.int64)
    label[:2, :2, :2] = 1
    uncertainty = torch.zeros(4, 4, 4)
    uncertainty[0, 0, 0] = 0.8  # one uncertain voxel inside the label
    uncertainty[2, :2, :2] = 0.6  # the 4 voxels only member 1 labels
    uncertainty[3, 3, 3] = 0.9  # uncertain, but no one labels it: not counted
    stats = label_statistics(
        label, uncertainty, samples, {"background": 0, "liver": 1, "spleen": 2}, voxel_volume_mm3=10.0
    )
    assert set(stats) == {"liver", "spleen"}
    liver = stats["liver"]
    assert liver["volume_ml"] == pytest.approx(8 * 10.0 / 1000.0)
    assert liver["mean_uncertainty"] == pytest.approx(0.8 / 8)
    assert liver["uncertain_volume_ml"] == pytest.approx((1 + 4) * 10.0 / 1000.0)
    assert liver["sample_agreement"] == pytest.approx(2 * 8 / (8 + 12))
    assert stats["spleen"] == {
        "volume_ml": 0.0,
        "mean_uncertainty": 0.0,
        "uncertain_volume_ml": 0.0,
        "sample_agreement": 1.0,
    }
    json.dumps(stats)
    for entry in stats.values():
        assert all(type(v) is float for v in entry.values())
    # without samples: only the fused label counts, agreement is unknown
    no_samples = label_statistics(label, uncertainty, None, {"liver": 1}, voxel_volume_mm3=10.0)
    assert no_samples["liver"]["uncertain_volume_ml"] == pytest.approx(10.0 / 1000.0)
    assert no_samples["liver"]["sample_agreement"] is None


def test_fuse_mean_and_vote():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.8, 0.1], [0.0, 0.0, 0.8]])
    assert fuse(probs=probs, method="mean").tolist() == [0, 1, 2]
    samples = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 1], [1, 2, 2, 2]], dtype=torch.uint8)
    fused = fuse(samples=samples, method="vote")
    assert fused.dtype == torch.int64
    assert fused.tolist() == [0, 1, 2, 0]  # last voxel: 3-way tie -> lowest index


def test_fuse_vote_ties():
    samples = torch.tensor([[0, 2], [1, 1]])
    assert fuse(samples=samples, method="vote", num_classes=3).tolist() == [0, 1]
    # ties broken by the mean probability when it is given
    probs = torch.tensor([[0.4, 0.1], [0.6, 0.3], [0.0, 0.6]])
    assert fuse(probs=probs, samples=samples, method="vote").tolist() == [1, 2]


def test_fuse_staple_binary_majority():
    square = torch.zeros(8, 8, dtype=torch.uint8)
    square[2:6, 2:6] = 1
    r2 = square.clone()
    r2[2:6, 6] = 1  # one rater adds a column
    r3 = square.clone()
    r3[2, 2:6] = 0  # another misses a row
    samples = torch.stack([square, r2, r3])
    fused = fuse(samples=samples, method="staple")
    assert fused.dtype == torch.int64 and fused.shape == (8, 8)
    assert torch.equal(fused, square.long())  # the majority
    assert torch.equal(fused, fuse(samples=samples, method="vote"))


def test_fuse_staple_multilabel_majority():
    base = torch.zeros(6, 6, dtype=torch.uint8)
    base[1:3, 1:4] = 1
    base[3:5, 2:5] = 2
    r2 = base.clone()
    r2[1, 4] = 1
    r3 = base.clone()
    r3[4, 2] = 0
    fused = fuse(samples=torch.stack([base, r2, r3]), method="staple", num_classes=3)
    assert torch.equal(fused, base.long())


def test_fuse_staple_unanimous_and_empty():
    samples = torch.zeros(3, 5, 5, dtype=torch.uint8)
    assert fuse(samples=samples, method="staple").sum().item() == 0
    samples[:, 1:3, 1:3] = 1
    assert torch.equal(fuse(samples=samples, method="staple"), samples[0].long())


def test_fuse_errors():
    with pytest.raises(ValueError, match="mean, vote, staple"):
        fuse(probs=torch.ones(2, 2), method="median")
    with pytest.raises(ValueError):
        fuse(probs=torch.ones(2, 2), method="vote")  # no samples
