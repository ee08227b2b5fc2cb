"""Evaluation metrics for (ambiguous) segmentation ensembles.

* Dice and HD95 come from ``monai.metrics`` (computed one class at a time, so no ``K``-channel one-hot
  of a whole volume is built).
* Generalised energy distance (Kohl et al., 2018, "A probabilistic U-Net for segmentation of ambiguous
  images") and the collective-insight score (Rahman et al., 2023, "Ambiguous medical image segmentation
  using diffusion models", CVPR) compare a set of samples with a set of reference annotations.
* Uncertainty-error AUROC and expected calibration error (Guo et al., 2017, "On calibration of modern
  neural networks") judge the uncertainty maps.
* Summary statistics over cases (``summarise``, ``spearman``, ``binned_auroc``) for the reports.

Label maps are integer tensors ``[*spatial]`` (2D or 3D), probabilities ``[K, *spatial]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.stats import spearmanr
from torch import Tensor

__all__ = [
    "dice_per_label",
    "hd95_per_label",
    "iou",
    "ged",
    "ci_score",
    "uncertainty_auroc",
    "expected_calibration_error",
    "summarise",
    "spearman",
    "binned_auroc",
]


def _channel(mask: Tensor) -> Tensor:
    """Boolean mask ``[*spatial]`` -> float ``[1, 1, *spatial]`` (batch, channel) for monai.metrics."""
    return mask[None, None].float()


def dice_per_label(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground label ``1 .. K-1`` between two label maps, via
    ``monai.metrics.compute_dice``.

    ``ignore_empty=False`` semantics: when a label is absent from both ``pred`` and ``target`` its Dice is
    1.0 (a correct "nothing here"); absent from only one side gives 0.0.
    """
    scores = []
    for c in range(1, num_classes):
        dice = compute_dice(_channel(pred == c), _channel(target == c), include_background=True, ignore_empty=False)
        scores.append(float(dice.item()))
    return scores


def hd95_per_label(
    pred: Tensor, target: Tensor, num_classes: int, spacing: Sequence[float] | None = None
) -> list[float]:
    """95th-percentile symmetric Hausdorff distance of each foreground label ``1 .. K-1``, via
    ``monai.metrics.compute_hausdorff_distance(percentile=95)``.

    In physical units when ``spacing`` (one value per spatial axis, in the axis order of the tensor) is
    given, otherwise in voxels. A label absent from both maps scores 0.0; absent from exactly one map the
    distance is undefined and scores ``nan`` (aggregate with ``nanmean`` and report the count).
    """
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        has_p, has_t = bool(p.any()), bool(t.any())
        if not has_p and not has_t:
            scores.append(0.0)
        elif has_p != has_t:
            scores.append(math.nan)
        else:
            hd = compute_hausdorff_distance(
                _channel(p), _channel(t), include_background=True, percentile=95, spacing=spacing
            )
            scores.append(float(hd.item()))
    return scores


def iou(a: Tensor, b: Tensor) -> float:
    """Intersection over union of two boolean masks; ``IoU(empty, empty) = 1``."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum().item())
    if union == 0:
        return 1.0
    return int((a & b).sum().item()) / union


def _dice(a: Tensor, b: Tensor) -> float:
    """Dice of two boolean masks; ``Dice(empty, empty) = 1`` (as in Rahman et al., 2023)."""
    size = int(a.sum().item()) + int(b.sum().item())
    if size == 0:
        return 1.0
    return 2.0 * int((a & b).sum().item()) / size


def _foreground_classes(num_classes: int | None) -> list[int | None]:
    """Classes to evaluate: ``[None]`` means binary foreground ``x > 0``; otherwise ``1 .. K-1``."""
    if num_classes is None or num_classes <= 2:
        return [None]
    return list(range(1, num_classes))


def _mask(x: Tensor, c: int | None) -> Tensor:
    return x > 0 if c is None else x == c


def ged(samples: Sequence[Tensor], references: Sequence[Tensor], num_classes: int | None = None) -> float:
    """Squared generalised energy distance (Kohl et al., 2018):

    ``D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d(x, y) = 1 - IoU(x, y)``.

    Expectations are plain means over all ordered pairs, *including* ``S = S'`` and ``Y = Y'`` (which
    contribute ``d = 0``), as in the reference implementations of Kohl et al. and Baumgartner et al.
    (2019, PHiSeg). ``IoU(empty, empty) = 1``, so two empty masks are at distance 0.

    Args:
        samples: predicted label maps ``[*spatial]``.
        references: annotation label maps ``[*spatial]``.
        num_classes: None or 2: binary, foreground = label > 0. ``K > 2``: ``d`` is the mean of
            ``1 - IoU`` over the foreground classes ``1 .. K-1``.
    """
    classes = _foreground_classes(num_classes)

    def d(x: Tensor, y: Tensor) -> float:
        return sum(1.0 - iou(_mask(x, c), _mask(y, c)) for c in classes) / len(classes)

    def mean_d(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
        return sum(d(x, y) for x in xs for y in ys) / (len(xs) * len(ys))

    return 2.0 * mean_d(samples, references) - mean_d(samples, samples) - mean_d(references, references)


def _pair_variance(a: Tensor, b: Tensor) -> float:
    """Voxel variance of ``a - b`` for boolean masks (values in {-1, 0, 1}), from counts:
    ``|a xor b| / V - ((|a \\ b| - |b \\ a|) / V)^2``."""
    v = a.numel()
    a_only = int((a & ~b).sum().item())
    b_only = int((b & ~a).sum().item())
    return (a_only + b_only) / v - ((a_only - b_only) / v) ** 2


def _variance_range(masks: Sequence[Tensor]) -> tuple[float, float]:
    """``(V_min, V_max)`` over all pairs ``i < j``; ``(0, 0)`` for a single mask (no diversity)."""
    values = [_pair_variance(masks[i], masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return (min(values), max(values)) if values else (0.0, 0.0)


def _ci_components(samples: Sequence[Tensor], references: Sequence[Tensor]) -> tuple[float, float, float]:
    """``(S_c, D_max, D_a)`` for boolean masks."""
    union_ref = torch.stack(list(references)).any(dim=0)
    union_smp = torch.stack(list(samples)).any(dim=0)
    tp = int((union_ref & union_smp).sum().item())
    fn = int((union_ref & ~union_smp).sum().item())
    combined_sensitivity = tp / (tp + fn) if tp + fn > 0 else 1.0
    max_dice_matching = sum(max(_dice(y, s) for s in samples) for y in references) / len(references)
    ref_min, ref_max = _variance_range(references)
    smp_min, smp_max = _variance_range(samples)
    diversity_agreement = 1.0 - (abs(ref_max - smp_max) + abs(ref_min - smp_min)) / 2.0
    return combined_sensitivity, max_dice_matching, diversity_agreement


def ci_score(samples: Sequence[Tensor], references: Sequence[Tensor], num_classes: int | None = None) -> dict:
    """Collective-insight (CI) score of Rahman et al. (2023, CIMD), in ``[0, 1]``, higher is better.

    With ``Y_1..Y_M`` the references and ``S_1..S_N`` the samples (boolean foreground masks):

    * combined sensitivity ``S_c = TP / (TP + FN)`` of the union of the samples against the union of
      the references (1.0 when the references' union is empty);
    * maximum Dice matching ``D_max = (1/M) sum_i max_j Dice(Y_i, S_j)`` with ``Dice(empty, empty) = 1``;
    * diversity agreement ``D_a = 1 - (|V_max^Y - V_max^S| + |V_min^Y - V_min^S|) / 2``, where for a set
      of masks ``V_max`` / ``V_min`` are the largest / smallest *pairwise variance* over all pairs
      ``i < j``, and the pairwise variance of two masks is the population variance over voxels of their
      difference image ``Y_i - Y_j`` (values in {-1, 0, 1}). The paper gives the ``D_a`` formula but no
      code (none was released); this "variance of the difference between each pair" is our reading of
      its text. A set with a single mask has ``V_min = V_max = 0``.
    * ``CI = 3 / (1/S_c + 1/D_max + 1/D_a) = 3 S_c D_max D_a / (S_c D_max + D_max D_a + S_c D_a)``, the
      harmonic mean the paper describes (0 if any component is 0).

    Args:
        samples: predicted label maps ``[*spatial]``.
        references: annotation label maps ``[*spatial]``.
        num_classes: None or 2: binary (label > 0). ``K > 2``: each of the three components is averaged
            over the foreground classes ``1 .. K-1`` and CI is the harmonic mean of the averages.

    Returns:
        ``{"combined_sensitivity", "max_dice_matching", "diversity_agreement", "ci"}`` as floats.
    """
    classes = _foreground_classes(num_classes)
    totals = [0.0, 0.0, 0.0]
    for c in classes:
        parts = _ci_components([_mask(s, c) for s in samples], [_mask(y, c) for y in references])
        totals = [t + p for t, p in zip(totals, parts)]
    s_c, d_max, d_a = (t / len(classes) for t in totals)
    ci = 0.0 if min(s_c, d_max, d_a) <= 0.0 else 3.0 / (1.0 / s_c + 1.0 / d_max + 1.0 / d_a)
    return {"combined_sensitivity": s_c, "max_dice_matching": d_max, "diversity_agreement": d_a, "ci": ci}


def uncertainty_auroc(uncertainty: Tensor, error: Tensor) -> float:
    """Voxel-level AUROC of ``uncertainty`` as a detector of ``error`` (bool, same shape): the probability
    that a random erroneous voxel is more uncertain than a random correct one, ties counting 1/2
    (Mann-Whitney U / (n_pos n_neg)). ``nan`` if ``error`` is all False or all True.

    Hand-written with one sort over tied groups (exact with ties, O(V log V)), so 1e7 voxels take about
    a second; sklearn is not a dependency of this library.
    """
    scores = uncertainty.reshape(-1).float()
    labels = error.reshape(-1).bool()
    n_pos = int(labels.sum().item())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    scores, order = torch.sort(scores)
    labels = labels[order]
    del order
    _, group_size = torch.unique_consecutive(scores, return_counts=True)
    group_end = torch.cumsum(group_size, dim=0) - 1
    pos_cum = torch.cumsum(labels, dim=0, dtype=torch.int64)[group_end]
    pos_in_group = torch.diff(pos_cum, prepend=pos_cum.new_zeros(1)).double()
    neg_in_group = group_size.double() - pos_in_group
    neg_below = torch.cumsum(neg_in_group, dim=0) - neg_in_group
    u = (pos_in_group * (neg_below + 0.5 * neg_in_group)).sum()
    return float(u.item() / (n_pos * n_neg))


def expected_calibration_error(probs: Tensor, target: Tensor, bins: int = 10) -> tuple[float, dict]:
    """Expected calibration error (Guo et al., 2017) of voxel-wise top-label confidence.

    Confidence is ``max_k probs``, a voxel is correct when ``argmax_k probs == target``. Voxels fall in
    ``bins`` equal-width bins ``(lo, hi]`` of ``[0, 1]`` (confidence 0 goes to the first bin), and
    ``ECE = sum_b (n_b / n) |accuracy_b - confidence_b|``.

    Returns:
        ``(ece, diagram)`` with the reliability-diagram data ``diagram = {"bin_edges": [bins + 1],
        "confidence": [bins], "accuracy": [bins], "count": [bins]}``; ``confidence`` and ``accuracy`` of
        an empty bin are ``None``. Plain Python values, JSON-serialisable.
    """
    confidence, prediction = probs.float().max(dim=0)
    confidence = confidence.reshape(-1)
    correct = (prediction.reshape(-1) == target.reshape(-1).to(prediction.dtype)).double()
    del prediction
    edges = torch.linspace(0.0, 1.0, bins + 1)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    nonempty = count > 0
    conf_mean = torch.where(nonempty, conf_sum / count.clamp(min=1.0), torch.zeros_like(conf_sum))
    acc_mean = torch.where(nonempty, acc_sum / count.clamp(min=1.0), torch.zeros_like(acc_sum))
    total = count.sum()
    ece = float(((count / total) * (acc_mean - conf_mean).abs()).sum().item()) if total > 0 else 0.0
    diagram = {
        "bin_edges": [float(e) for e in edges.tolist()],
        "confidence": [float(c) if n else None for c, n in zip(conf_mean.tolist(), nonempty.tolist())],
        "accuracy": [float(a) if n else None for a, n in zip(acc_mean.tolist(), nonempty.tolist())],
        "count": [int(n) for n in count.tolist()],
    }
    return ece, diagram


# ------------------------------------------------------------------------------ summary statistics
def _numbers(values: Sequence[Any]) -> np.ndarray:
    out = [float(v) for v in values if v is not None]
    return np.asarray([v for v in out if math.isfinite(v)], dtype=np.float64)


def summarise(values: Sequence[Any]) -> dict[str, Any]:
    """``{"mean", "std", "median", "min", "max", "n", "n_undefined"}`` over the finite values;
    ``None`` and NaN count as undefined (e.g. HD95 of a label missing from one side)."""
    arr = _numbers(values)
    undefined = len(values) - len(arr)
    if len(arr) == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0, "n_undefined": undefined}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(len(arr)),
        "n_undefined": int(undefined),
    }


def spearman(x: Sequence[Any], y: Sequence[Any]) -> dict[str, Any]:
    """Spearman rank correlation of the pairs where both values are finite (``scipy.stats.spearmanr``:
    tie-averaged ranks, two-sided p-value from the t-approximation): ``{"rho", "p_value", "n"}``;
    ``rho`` and ``p_value`` are ``None`` with fewer than 3 pairs or a constant side."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a is not None and b is not None]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    a, b = np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])
    if n < 3 or a.std() == 0 or b.std() == 0:
        return {"rho": None, "p_value": None, "n": n}
    result = spearmanr(a, b)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def binned_auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC from per-bin counts of positives (errors) and negatives (correct voxels) over ascending
    score bins: voxels in the same bin count as ties (1/2). With fine bins this is the pooled voxel
    AUROC over many cases without holding their voxels (written here: scikit-learn's ``roc_auc_score``
    needs the voxels themselves); ``nan`` without both classes."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))
