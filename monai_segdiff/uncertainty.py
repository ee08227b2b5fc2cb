"""Fusion of ensemble members, voxel-wise uncertainty maps and case-level scores.

Conventions (shared with the sampler / inferer):

* ``probs``: float tensor ``[K, *spatial]``, mean class probabilities over the ensemble, channel 0 is
  background, sums to 1 over ``K``.
* ``samples``: integer tensor ``[N, *spatial]`` of class indices, one map per ensemble member.
* ``expected_entropy``: float tensor ``[*spatial]``, mean over members of each member's own predictive
  entropy **in nats** (natural log, not normalised), or ``None``.

``spatial`` is 2D or 3D. Everything runs on CPU tensors and works class by class (or member by member),
so no one-hot tensor of all members is ever materialised: a 512x512x300 volume with N=5 members needs a
few volumes' worth of memory, not ``N * K`` of them.

The uncertainty measures follow the Bayesian-deep-learning decomposition (Gal, 2016; Depeweg et al.,
2018, "Decomposition of uncertainty in Bayesian deep learning"): predictive entropy = aleatoric
(expected entropy) + epistemic (mutual information), and the sample variance used for diffusion
ensembles by Wolleb et al. (2022), "Diffusion models for implicit image segmentation ensembles".
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor

from .config import FUSION_METHODS, UNCERTAINTY_KINDS  # the option names belong to the config
from .diffusion.inferer import class_argmax, entropy

__all__ = [
    "FUSION_METHODS",
    "UNCERTAINTY_KINDS",
    "fuse",
    "predictive_entropy",
    "mutual_information",
    "sample_variance",
    "disagreement",
    "uncertainty_map",
    "case_score",
    "label_statistics",
]


def _num_classes(probs: Tensor | None, samples: Tensor | None, num_classes: int | None) -> int:
    """Number of classes from the argument, else from ``probs``, else from the largest sampled label."""
    if num_classes is not None:
        return int(num_classes)
    if probs is not None:
        return int(probs.shape[0])
    if samples is not None:
        return max(int(samples.max().item()) + 1, 2)
    raise ValueError("need probs, samples or num_classes to know the number of classes")


def _class_counts(samples: Tensor, num_classes: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(c, count_c)`` with ``count_c[*spatial]`` (int16) = number of members voting class ``c``.

    One class at a time, so peak memory is one boolean copy of ``samples`` plus one count volume.
    """
    for c in range(num_classes):
        yield c, (samples == c).sum(dim=0, dtype=torch.int16)


def _vote(samples: Tensor, num_classes: int, probs: Tensor | None = None) -> Tensor:
    """Per-voxel majority vote; ties go to the class with the higher mean probability when ``probs``
    is given, otherwise to the lower class index. Hand-written: a running arg-max over class counts."""
    best_count = torch.full(samples.shape[1:], -1, dtype=torch.int16)
    best_class = torch.zeros(samples.shape[1:], dtype=torch.int64)
    best_prob = torch.full(samples.shape[1:], -1.0) if probs is not None else None
    for c, count in _class_counts(samples, num_classes):
        better = count > best_count
        if probs is not None:
            better |= (count == best_count) & (probs[c] > best_prob)
            best_prob = torch.where(better, probs[c].float(), best_prob)
        best_count = torch.where(better, count, best_count)
        best_class[better] = c
    return best_class


def _staple(samples: Tensor, num_classes: int) -> Tensor:
    """STAPLE (Warfield et al., 2004, IEEE TMI 23(7)) via SimpleITK.

    Binary problems use ``STAPLEImageFilter`` on the foreground masks (foreground where the STAPLE
    posterior is > 0.5); multi-class problems use ``MultiLabelSTAPLEImageFilter`` (Rohlfing et al.,
    2004), whose undecided voxels are filled by majority vote.
    """
    if bool((samples == samples[0]).all()):
        return samples[0].long().clone()  # unanimous: STAPLE's estimate is degenerate but the answer is not
    arr = samples.cpu().numpy()
    if num_classes <= 2:
        fg = arr > 0
        if not fg.any():
            return torch.zeros(samples.shape[1:], dtype=torch.int64)
        raters = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in fg]
        staple = sitk.STAPLEImageFilter()
        staple.SetForegroundValue(1.0)
        posterior = sitk.GetArrayFromImage(staple.Execute(raters))
        return torch.from_numpy(posterior > 0.5).long()
    raters = [sitk.GetImageFromArray(m.astype(np.uint16)) for m in arr]
    staple = sitk.MultiLabelSTAPLEImageFilter()
    staple.SetLabelForUndecidedPixels(num_classes)
    fused = torch.from_numpy(sitk.GetArrayFromImage(staple.Execute(raters)).astype(np.int64))
    undecided = fused == num_classes
    if undecided.any():
        fused[undecided] = _vote(samples, num_classes)[undecided]
    return fused


def fuse(
    probs: Tensor | None = None,
    samples: Tensor | None = None,
    method: str = "mean",
    num_classes: int | None = None,
) -> Tensor:
    """Fuse an ensemble into one label map ``[*spatial]`` (int64).

    Args:
        probs: mean class probabilities ``[K, *spatial]``; required for ``"mean"``, used to break ties
            in ``"vote"``.
        samples: member label maps ``[N, *spatial]``; required for ``"vote"`` and ``"staple"``.
        method: ``"mean"`` (arg-max of the mean probabilities, the usual ensemble average),
            ``"vote"`` (per-voxel majority of the members; ties -> higher mean probability when
            ``probs`` is given, else lower class index) or ``"staple"`` (SimpleITK STAPLE, binary
            or multi-label, Warfield et al. 2004).
        num_classes: ``K``; defaults to ``probs.shape[0]`` or ``samples.max() + 1``.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; valid methods: {', '.join(FUSION_METHODS)}")
    if method == "mean":
        if probs is None:
            raise ValueError("fusion method 'mean' needs probs")
        return class_argmax(probs, 0)  # = probs.argmax(0), without torch's slow strided reduction
    if samples is None:
        raise ValueError(f"fusion method {method!r} needs samples")
    k = _num_classes(probs, samples, num_classes)
    if method == "vote":
        return _vote(samples, k, probs)
    return _staple(samples, k)


def predictive_entropy(probs: Tensor, normalise: bool = True) -> Tensor:
    """Predictive (total) entropy ``H[E_theta p(y|x, theta)] = -sum_k p_k log p_k`` of the mean
    probabilities, ``[*spatial]``.

    Args:
        probs: mean class probabilities ``[K, *spatial]``.
        normalise: divide by ``log K`` so the result is in ``[0, 1]`` (1 = uniform over classes).
    """
    nats = entropy(probs, 0)
    k = probs.shape[0]
    if normalise:
        nats = (nats / math.log(k)).clamp_(max=1.0) if k > 1 else torch.zeros_like(nats)
    return nats


def mutual_information(probs: Tensor, expected_entropy: Tensor, normalise: bool = True) -> Tensor:
    """Mutual information (BALD; Houlsby et al., 2011; Gal et al., 2017) between the label and the
    ensemble member: ``H[mean p] - mean_n H[p_n]``, the epistemic part of the predictive entropy.

    Args:
        probs: mean class probabilities ``[K, *spatial]``.
        expected_entropy: ``mean_n H[p_n]`` in nats, ``[*spatial]``.
        normalise: divide by ``log K`` (the maximum of the predictive entropy), giving ``[0, 1]``.

    Clamped at 0: numerically the difference can be slightly negative.
    """
    mi = (entropy(probs, 0) - expected_entropy.float()).clamp_(min=0.0)
    k = probs.shape[0]
    if normalise:
        mi = (mi / math.log(k)).clamp_(max=1.0) if k > 1 else torch.zeros_like(mi)
    return mi


def sample_variance(samples: Tensor, num_classes: int) -> Tensor:
    """Variance of the ensemble members, ``[*spatial]`` (Wolleb et al., 2022).

    For each class ``c`` the one-hot indicator ``1[s_n = c]`` has population variance
    ``f_c (1 - f_c)`` across the ``N`` members, where ``f_c`` is the fraction voting ``c``; the map is
    the mean of that over the ``K`` classes. Binary: ``f (1 - f) in [0, 0.25]``; 0 where all agree.
    """
    n = samples.shape[0]
    variance = torch.zeros(samples.shape[1:], dtype=torch.float32)
    for _, count in _class_counts(samples, num_classes):
        frac = count.float() / n
        variance += frac * (1.0 - frac)
    return variance / num_classes


def disagreement(samples: Tensor) -> Tensor:
    """Fraction of members that differ from the per-voxel mode, ``1 - max_c f_c`` in ``[0, 1 - 1/N]``.

    Hand-written (a running maximum of the class counts); no library provides it.
    """
    n = samples.shape[0]
    k = int(samples.max().item()) + 1
    mode_count = torch.zeros(samples.shape[1:], dtype=torch.int16)
    for _, count in _class_counts(samples, k):
        torch.maximum(mode_count, count, out=mode_count)
    return 1.0 - mode_count.float() / n


def uncertainty_map(
    kind: str,
    probs: Tensor | None,
    samples: Tensor | None,
    expected_entropy: Tensor | None = None,
) -> Tensor:
    """Voxel-wise uncertainty ``[*spatial]`` of the given ``kind``.

    Args:
        kind: ``"entropy"`` (normalised predictive entropy), ``"mutual_information"`` (normalised;
            needs ``expected_entropy``), ``"variance"`` (Wolleb et al. sample variance) or
            ``"disagreement"`` (fraction of members off the mode).
        probs: mean class probabilities ``[K, *spatial]``.
        samples: member label maps ``[N, *spatial]``.
        expected_entropy: ``mean_n H[p_n]`` in nats, for ``"mutual_information"``.
    """
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"unknown uncertainty kind {kind!r}; valid kinds: {', '.join(UNCERTAINTY_KINDS)}")
    if kind in ("entropy", "mutual_information") and probs is None:
        raise ValueError(f"uncertainty {kind!r} needs probs")
    if kind in ("variance", "disagreement") and samples is None:
        raise ValueError(f"uncertainty {kind!r} needs samples")
    if kind == "entropy":
        return predictive_entropy(probs)
    if kind == "mutual_information":
        if expected_entropy is None:
            raise ValueError("uncertainty 'mutual_information' needs expected_entropy")
        return mutual_information(probs, expected_entropy)
    if kind == "variance":
        return sample_variance(samples, _num_classes(probs, samples, None))
    return disagreement(samples)


def case_score(uncertainty: Tensor, probs: Tensor | None = None, samples: Tensor | None = None) -> float:
    """One uncertainty score per case, used to rank images for active learning.

    Definition: class-balanced mean uncertainty over the *candidate regions*. The candidate region of
    foreground class ``c`` is where any ensemble member predicts ``c`` (``(samples == c).any(0)``), or,
    when ``samples`` is None, where its mean probability exceeds 0.01. The score is the mean over the
    classes with a non-empty region of the mean ``uncertainty`` inside that class's region; 0.0 when
    no class has one. With one foreground class it is the mean uncertainty where anything is predicted.

    Dividing by the region size (instead of summing, or averaging over the whole image) makes the score
    a per-voxel rate: a large organ does not outrank a small lesion just by having more boundary
    voxels, and a small structure is not drowned by the empty background of a large image. Averaging
    over classes (instead of pooling their voxels) lets a small, uncertain lesion count as much as a
    large, confident organ, so the cases the model is least sure of for *any* structure rank first.
    """
    if samples is not None:
        num_classes = int(samples.max().item()) + 1 if samples.numel() else 1
        regions = [(samples == c).any(dim=0) for c in range(1, num_classes)]
    elif probs is not None:
        regions = [p > 0.01 for p in probs[1:]]
    else:
        raise ValueError("case_score needs probs or samples to define the candidate regions")
    means = [uncertainty[r].double().mean().item() for r in regions if bool(r.any())]
    return float(sum(means) / len(means)) if means else 0.0


def _mean_pairwise_dice(masks: Tensor) -> float:
    """Mean Dice over all member pairs ``i < j`` of boolean masks ``[N, V]``; a pair of empty masks has
    Dice 1. Hand-written: one small Gram matrix instead of N(N-1)/2 passes over the volume."""
    n = masks.shape[0]
    if n < 2:
        return 1.0
    m = masks.float()
    inter = (m @ m.T).double()
    size = inter.diagonal()
    denom = size[:, None] + size[None, :]
    dice = torch.where(denom > 0, 2.0 * inter / denom.clamp(min=1.0), torch.ones_like(denom))
    i, j = torch.triu_indices(n, n, offset=1)
    return float(dice[i, j].mean().item())


def label_statistics(
    label: Tensor,
    uncertainty: Tensor,
    samples: Tensor | None,
    label_names: dict[str, int],
    voxel_volume_mm3: float,
    threshold: float = 0.5,
) -> dict[str, dict]:
    """Per-label statistics of a fused prediction, as plain JSON-serialisable Python values.

    For every foreground entry of ``label_names`` (index 0, the background, is skipped):

    * ``volume_ml``: volume of the fused ``label`` (voxels x ``voxel_volume_mm3`` / 1000).
    * ``mean_uncertainty``: mean of ``uncertainty`` inside the fused label, 0.0 if the label is empty.
    * ``uncertain_volume_ml``: volume of the voxels that are in the fused label *or* predicted as that
      label by any member, and whose uncertainty is ``> threshold``.
    * ``sample_agreement``: mean pairwise Dice between members for that label (1.0 when all members
      leave it empty or there is a single member); ``None`` when ``samples`` is None.

    Args:
        label: fused label map ``[*spatial]``.
        uncertainty: uncertainty map ``[*spatial]``.
        samples: member label maps ``[N, *spatial]`` or None.
        label_names: ``{name: index}``.
        voxel_volume_mm3: volume of one voxel in mm^3.
        threshold: uncertainty above which a voxel counts as uncertain.
    """
    ml_per_voxel = float(voxel_volume_mm3) / 1000.0
    uncertain = uncertainty > threshold
    stats: dict[str, dict] = {}
    for name, index in label_names.items():
        index = int(index)
        if index == 0:
            continue
        mask = label == index
        voxels = int(mask.sum().item())
        mean_unc = float(uncertainty[mask].double().mean().item()) if voxels else 0.0
        region = mask
        agreement: float | None = None
        if samples is not None:
            member_masks = samples == index
            any_member = member_masks.any(dim=0)
            region = mask | any_member
            # only voxels some member labels matter for the Dice: index them out, [N, V_union]
            agreement = _mean_pairwise_dice(member_masks[:, any_member])
            del member_masks
        stats[str(name)] = {
            "volume_ml": voxels * ml_per_voxel,
            "mean_uncertainty": mean_unc,
            "uncertain_volume_ml": int((region & uncertain).sum().item()) * ml_per_voxel,
            "sample_agreement": agreement,
        }
    return stats
