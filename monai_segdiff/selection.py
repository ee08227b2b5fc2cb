"""Which unlabelled cases to annotate next: the selection rules of active learning, as pure functions of
scores, image features and (for the foreground-aware baseline) which classes a case contains.

Every rule takes the candidate ids, how many to pick and a seeded :class:`random.Random`, and returns the
picked ids in pick order; ties are broken by id, so a rule's picks are reproducible and can be computed by
hand.

* :func:`top_scores` -- the highest scores (MONAI Label's own strategies and ``segdiff_uncertainty``).
* :func:`power_scores` -- stochastic power acquisition (Kirsch et al., "Stochastic Batch Acquisition",
  TMLR 2023): draws without replacement with probability proportional to ``score ** beta``.
* :func:`foreground_random` -- nnActive's strongest simple baseline (Luth et al., "nnActive: A Framework
  for Evaluation of Active Learning in 3D Biomedical Segmentation", TMLR 2025: "Random 33% FG"): random,
  but a share of the picks is drawn among the cases that contain a foreground class. nnActive draws
  patches centred on foreground; for whole cases the analogue is a case known to contain the class (an
  annotator sees at a glance whether a structure is there).
* :func:`diverse_top` -- uncertainty guarded against outliers and redundancy: (1) the least *typical*
  cases (TypiClust, Hacohen et al., ICML 2022: typicality = inverse mean distance to the k nearest
  neighbours in feature space) are set aside, since on a CPU budget a model learns little from a case
  unlike any other; (2) the ``prefilter`` x n most uncertain remaining cases are clustered into n groups
  with k-means on the features (Zhdanov, "Diverse mini-batch Active Learning", 2019); (3) each group gives
  its most uncertain case, so one round never spends its labels on n near-copies of one hard case.

* :func:`input_slice_scores` / :func:`uncertain_slices` -- partial annotation: the mean uncertainty of each
  slice of a case, on the input image's own slices, and the most uncertain slices at least ``min_gap``
  apart (neighbouring slices are near copies); :func:`random_slices` and :func:`foreground_slices` are the
  baselines in the same unit.

Written here: MONAI Label's strategies rank a single score, and no MONAI, scipy or torch routine selects
by typicality and clusters; the k-means itself is scipy's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.cluster.vq import kmeans2

__all__ = ["top_scores", "power_scores", "foreground_random", "typicality", "diverse_top", "input_slice_scores",
           "uncertain_slices", "case_slices", "random_slices", "foreground_slices", "slice_axis"]

FG_SHARE = 1.0 / 3.0  # nnActive's "Random 33% FG"
TYPICAL_NEIGHBOURS = 5  # TypiClust's k (it uses 20 on image-classification pools of thousands)
ATYPICAL_SHARE = 0.1  # share of the least typical candidates set aside as outliers
PREFILTER = 3  # the most uncertain prefilter x n candidates are clustered (Zhdanov uses 10x on larger pools)


def top_scores(ids: Sequence[str], scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` highest scores (ties: smaller id first)."""
    return sorted(ids, key=lambda i: (-float(scores[i]), i))[:n]


def power_scores(ids: Sequence[str], scores: Mapping[str, float], n: int, rng: random.Random,
                 beta: float = 1.0) -> list[str]:
    """``n`` draws without replacement, ``P(i) ~ score_i ** beta`` (Gumbel-top-k)."""
    keys = {i: beta * math.log(max(float(scores[i]), 1e-12)) - math.log(-math.log(rng.random() or 1e-300))
            for i in sorted(ids)}
    return sorted(keys, key=lambda i: (-keys[i], i))[:n]


def foreground_random(ids: Sequence[str], classes: Mapping[str, set[int]], n: int, rng: random.Random,
                      share: float = FG_SHARE) -> list[str]:
    """``n`` random cases; each pick, with probability ``share``, is drawn among the remaining cases that
    contain a foreground class (one drawn uniformly among the classes some remaining case contains), else
    uniformly. ``classes``: the foreground values each case's label contains."""
    left, picked = sorted(ids), []
    while left and len(picked) < n:
        present = sorted({c for i in left for c in classes.get(i, ())})
        if present and rng.random() < share:
            c = rng.choice(present)
            choice = rng.choice([i for i in left if c in classes.get(i, ())])
        else:
            choice = rng.choice(left)
        picked.append(choice)
        left.remove(choice)
    return picked


def typicality(features: np.ndarray, neighbours: int = TYPICAL_NEIGHBOURS) -> np.ndarray:
    """TypiClust's typicality of each row: ``1 / mean distance to its k nearest other rows``."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        return np.ones(len(x))
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    k = min(neighbours, len(x) - 1)
    return 1.0 / np.maximum(np.sort(dist, axis=1)[:, :k].mean(1), 1e-12)


def diverse_top(ids: Sequence[str], scores: Mapping[str, float], features: Mapping[str, np.ndarray], n: int,
                rng: random.Random, prefilter: int = PREFILTER, atypical_share: float = ATYPICAL_SHARE,
                neighbours: int = TYPICAL_NEIGHBOURS) -> list[str]:
    """The most uncertain case of each of ``n`` k-means groups of the most uncertain typical cases (see the
    module doc). Features are standardised per dimension over ``ids``; picks are in descending score."""
    ids = sorted(ids)
    if len(ids) <= n:
        return top_scores(ids, scores, n)
    x = np.stack([np.asarray(features[i], dtype=np.float64).ravel() for i in ids])
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    typ = typicality(x, neighbours)
    drop = min(int(math.floor(atypical_share * len(ids))), len(ids) - n)
    outliers = {ids[j] for j in np.argsort(typ, kind="stable")[:drop]}
    keep = [i for i in ids if i not in outliers]
    candidates = top_scores(keep, scores, max(n, prefilter * n))
    if len(candidates) <= n:
        return candidates
    rows = np.stack([x[ids.index(i)] for i in candidates])
    seed = rng.randrange(2**31)
    _, groups = kmeans2(rows, n, minit="++", seed=np.random.default_rng(seed))
    picked = [top_scores([c for c, g in zip(candidates, groups) if g == j], scores, 1) for j in range(n)]
    picked = [p[0] for p in picked if p]
    rest = [c for c in candidates if c not in picked]  # an empty group: the next most uncertain case
    picked += rest[: n - len(picked)]
    return top_scores(picked, scores, n)


# -- partial annotation: slices of one case -------------------------------------------------------------
SLICE_GAP = 2  # the picked slices of a case are at least this many input slices apart


def slice_axis(affine: np.ndarray) -> int:
    """The array axis (0..2) of an image with this RAS ``affine`` that runs most nearly along S (foot to
    head): the axis a slice model cuts across after MONAI's ``Orientationd("RAS")``."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(rot[2])))


def input_slice_scores(work_map: np.ndarray, work_affine: np.ndarray, input_affine: np.ndarray,
                       input_shape: Sequence[int]) -> tuple[int, dict[int, float]]:
    """Per-slice mean of an uncertainty map on the working grid (RAS, resampled; the last axis runs
    along S), on the input image's slices: ``(axis, {input slice index: score})``. Each working slice goes
    to the input slice nearest its centre (the one nearest-neighbour resampling copies into it, so a
    label drawn on that input slice reaches exactly that working slice); several working slices on one
    input slice keep the highest score."""
    work = np.asarray(work_map, dtype=np.float64)
    axis = slice_axis(input_affine)
    to_input = np.linalg.inv(np.asarray(input_affine, dtype=np.float64)) @ np.asarray(work_affine, dtype=np.float64)
    cx, cy = (work.shape[0] - 1) / 2, (work.shape[1] - 1) / 2
    out: dict[int, float] = {}
    for k in range(work.shape[2]):
        j = int(np.floor((to_input @ np.array([cx, cy, k, 1.0]))[axis] + 0.5))
        if 0 <= j < int(input_shape[axis]):
            out[j] = max(out.get(j, -math.inf), float(work[..., k].mean()))
    return axis, out


def uncertain_slices(scores: Mapping[int, float], n: int, min_gap: int = SLICE_GAP) -> list[int]:
    """The ``n`` highest-scoring slices (ties: lower index first) whose indices are at least ``min_gap``
    apart, greedily; fewer when the case has no more such slices. Returned sorted."""
    picked: list[int] = []
    for j in sorted(scores, key=lambda i: (-scores[i], i)):
        if len(picked) >= n:
            break
        if all(abs(j - p) >= min_gap for p in picked):
            picked.append(j)
    return sorted(picked)


def case_slices(scores: Mapping[int, float], n: int, min_gap: int = SLICE_GAP) -> tuple[list[int], float]:
    """One case's :func:`uncertain_slices` and their mean score (0 without slices): the partial-annotation
    rules rank cases by that mean and hand out those slices."""
    picked = uncertain_slices(scores, n, min_gap)
    return picked, float(np.mean([scores[j] for j in picked])) if picked else 0.0


def random_slices(candidates: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """``n`` slices drawn uniformly without replacement among ``candidates``, sorted."""
    return sorted(rng.sample(sorted(candidates), min(n, len(candidates))))


def foreground_slices(candidates: Sequence[int], foreground: set[int], n: int, rng: random.Random,
                      share: float = FG_SHARE) -> list[int]:
    """nnActive's foreground-aware random in slices: ``round(share * n)`` (at least one when ``share`` > 0)
    drawn among the candidate slices holding foreground, the rest uniformly among the others; sorted."""
    fg = sorted(set(candidates) & set(foreground))
    k = min(len(fg), max(1 if share > 0 else 0, round(share * n))) if fg else 0
    picked = rng.sample(fg, k)
    rest = sorted(set(candidates) - set(picked))
    return sorted(picked + rng.sample(rest, min(n - k, len(rest))))
