"""Active-learning selection rules (``monai_segdiff.selection``) against picks computed by hand, the
image-path features they cluster on, and the simulation's budget-curve statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from monai_segdiff.al_simulation import _pick, aubc, seed_summary
from monai_segdiff.selection import diverse_top, foreground_random, power_scores, top_scores, typicality


def test_top_scores_takes_the_highest_ties_by_id():
    scores = {"c": 0.2, "a": 0.5, "b": 0.5, "d": 0.9}
    assert top_scores(list(scores), scores, 3) == ["d", "a", "b"]
    pool = [{"id": i} for i in scores]
    assert _pick("segdiff_uncertainty", pool, {i: {"score": v} for i, v in scores.items()}, 2, random.Random(0)) == ["d", "a"]


def test_power_scores_never_draw_a_zero_score_and_favour_high_ones():
    scores = {"a": 0.8, "b": 0.2, "z": 0.0}
    firsts = [power_scores(list(scores), scores, 1, random.Random(s))[0] for s in range(1000)]
    assert "z" not in firsts and abs(firsts.count("a") / 1000 - 0.8) < 0.05


def test_foreground_random_draws_its_share_among_cases_with_the_class():
    classes = {f"c{i:02d}": ({1} if i < 2 else set()) for i in range(20)}  # 2 of 20 cases hold foreground
    # share 1: every pick while a case holds foreground is one of them, then uniform over the rest
    picks = foreground_random(list(classes), classes, 3, random.Random(0), share=1.0)
    assert set(picks[:2]) == {"c00", "c01"} and picks[2] not in picks[:2]
    # share 0: plain random: per pick one coin (while some case holds foreground), then a uniform choice
    # among the sorted remaining ids
    rng, left, hand = random.Random(5), sorted(classes), []
    for _ in range(4):
        if any(classes[i] for i in left):
            assert rng.random() >= 0.0
        hand.append(rng.choice(left))
        left.remove(hand[-1])
    assert foreground_random(list(classes), classes, 4, random.Random(5), share=0.0) == hand
    # the default third: P(first pick holds foreground) = 1/3 + 2/3 * 2/20 = 0.4, vs 0.1 for random
    hits = sum(foreground_random(list(classes), classes, 1, random.Random(s))[0] in ("c00", "c01") for s in range(2000))
    assert abs(hits / 2000 - 0.4) < 0.04
    pool = [{"id": i} for i in classes]
    assert _pick("fg_random", pool, None, 2, random.Random(0), classes=classes, fg_share=1.0)[:2] in (["c00", "c01"], ["c01", "c00"])


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert typicality(x, neighbours=1) == pytest.approx([1.0, 1.0, 1.0, 1 / 8])
    assert typicality(x, neighbours=2) == pytest.approx([1 / 1.5, 1.0, 1 / 1.5, 1 / 8.5])


def _two_groups_and_an_outlier():
    rng = np.random.default_rng(0)
    features, scores = {}, {}
    for j in range(5):  # group a: the most uncertain; group b: less; the outlier: most uncertain of all
        features[f"a{j}"], scores[f"a{j}"] = rng.normal(0.0, 0.1, 2), 0.9 - 0.05 * j
        features[f"b{j}"], scores[f"b{j}"] = rng.normal(10.0, 0.1, 2), 0.5 - 0.05 * j
    features["o"], scores["o"] = np.array([100.0, -100.0]), 0.99
    return features, scores


def test_diverse_top_sets_the_outlier_aside_and_picks_one_case_per_group():
    features, scores = _two_groups_and_an_outlier()
    ids = sorted(scores)
    assert top_scores(ids, scores, 2) == ["o", "a0"]  # plain uncertainty: the outlier and a near-copy of a0
    # by hand: 11 cases -> the least typical 1 (o) aside; the 3 x 2 = 6 most uncertain typical ones are
    # a0..a4 and b0; two k-means groups {a0..a4}, {b0}; each gives its most uncertain case
    for seed in range(5):
        assert diverse_top(ids, scores, features, 2, random.Random(seed)) == ["a0", "b0"]
    # a pool no larger than the batch: all of it, most uncertain first
    assert diverse_top(["b1", "a2"], scores, features, 2, random.Random(0)) == ["a2", "b1"]
    pool = [{"id": i} for i in ids]
    picked = _pick("diverse_uncertainty", pool, {i: {"score": v} for i, v in scores.items()}, 2, random.Random(0),
                   features=features)
    assert picked == ["a0", "b0"]


def test_budget_curve_area_and_seed_statistics_by_hand():
    rounds = [{"n_labelled": n, "dice": d} for n, d in ((2, 0.5), (4, 0.7), (6, 0.8))]
    assert aubc(rounds) == pytest.approx((0.6 * 2 + 0.75 * 2) / 4)
    runs = []
    for seed, (r, f, u) in enumerate(((0.6, 0.62, 0.70), (0.62, 0.61, 0.71), (0.58, 0.61, 0.69))):
        for name, final in (("random", r), ("fg_random", f), ("segdiff_uncertainty", u)):
            runs.append({"strategy": name, "seed": seed, "rounds": [{"n_labelled": 2, "dice": 0.5},
                                                                    {"n_labelled": 4, "dice": final}]})
    out = seed_summary(runs, ["random", "fg_random", "segdiff_uncertainty"])
    u = out["segdiff_uncertainty"]
    assert u["aubc"]["mean"] == pytest.approx((0.5 + 0.70) / 2) and u["aubc"]["n"] == 3
    diffs = np.array([0.70 - 0.62, 0.71 - 0.61, 0.69 - 0.61]) / 2
    assert u["vs"]["fg_random"]["mean"] == pytest.approx(diffs.mean())
    assert u["vs"]["fg_random"]["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3), abs=1e-12)
    assert u["vs"]["fg_random"]["beats_by_2se"]  # +0.04, +0.05, +0.04: mean 0.043 > 2 SE = 0.0067
    assert not out["fg_random"]["vs"]["random"]["beats_by_2se"]  # +0.01, -0.005, +0.015: mean 0.0067 < 2 SE = 0.012
    assert out["segdiff_uncertainty"]["n_to_reach_random_final"]["per_seed"] == [4, 4, 4]
    assert "fg_random" not in out["fg_random"]["vs"]


@pytest.mark.parametrize("network", ["medsegdiff", "concat"])
def test_features_come_from_the_image_path_and_tell_images_apart(network):
    from conftest import PHANTOMS
    from monai_segdiff.config import SegDiffConfig
    from monai_segdiff.networks import build_network
    from monai_segdiff.segmenter import Segmenter

    cfg = SegDiffConfig(labels=["organ", "lesion"], network=network, channels=[16, 16, 32], norm_num_groups=8,
                        attention_levels=[False] * 3, spacing=[-1, -1, -1])
    torch.manual_seed(0)
    seg = Segmenter(build_network(cfg), cfg)
    a = seg.features(str(PHANTOMS / "phantom_000.nii.gz"))
    # medsegdiff: every conditioning tensor pooled (head + one per level + anchor); concat: the image itself
    assert a.ndim == 1 and (a.numel() > 16 if network == "medsegdiff" else a.numel() == cfg.in_channels)
    assert torch.isfinite(a).all() and torch.equal(a, seg.features(str(PHANTOMS / "phantom_000.nii.gz")))
    assert not torch.allclose(a, seg.features(str(PHANTOMS / "phantom_004.nii.gz")))
