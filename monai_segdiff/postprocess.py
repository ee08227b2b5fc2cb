"""Optional clean-up of the fused mask, built from MONAI transforms; off unless asked for.

* ``median``: median filter (3 voxels wide, ``MedianSmooth``) of each class probability map before the
  arg-max (mean fusion); with vote / STAPLE fusion, of the one-hot fused mask (a majority filter).
  Removes salt-and-pepper voxels and smooths ragged borders.
* ``confident_component``: keep, of each label, the candidate region the ensemble is surest of. The
  candidates are the face-connected components where the label's (unfiltered) probability is at least
  0.1; the kept one has the highest mean probability over its component, reaches 0.5 somewhere and
  has a mean of at least 0.45, otherwise the label is left out. Inside the kept region the label
  competes with its unfiltered probability, so the median filter cannot erase a small object. Works
  on probabilities (mean fusion). For one object per label, like ``largest_component``, but a small
  sharp lesion beats a larger blurred false one, and a label with no confident region stays empty
  (BENCHMARKS.md, sessions 10 and 11).
* ``largest_component``: keep the largest face-connected component of each label
  (``KeepLargestConnectedComponent``, per label independently): drops isolated false-positive specks.
* ``fill_holes``: background enclosed by a label becomes that label (``FillHoles``; background counts
  as open if it reaches the border through any neighbour, diagonals included); other labels inside it
  (a lesion inside an organ) are kept.

They run in this order (median, confident component, largest component, fill holes) in the image's
own dimensionality (3D components and holes for a volume, even with a 2D model). The uncertainty map
is left as the ensemble gave it. One ``PostProcess`` is applied by ``Segmenter``, so the CLI, the app,
evaluation and scoring share it; the checkpoint config's ``postprocess`` list is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import FillHoles, KeepLargestConnectedComponent
from scipy import ndimage
from torch import Tensor

from .config import POSTPROCESS_OPTIONS, parse_postprocess  # the option names belong to the config

__all__ = ["POSTPROCESS_OPTIONS", "PostProcess", "parse_postprocess"]

CANDIDATE_FLOOR = 0.1  # probability above which a voxel belongs to a candidate region
MIN_PEAK = 0.5  # the highest probability a kept candidate region needs
# the mean probability it needs: 0.45 rather than 0.5, as test-time flips average the views' answers
# into lower means (420 fresh phantoms: lesion Dice +0.013 with two views, level with one; session 11)
MIN_MEAN = 0.45


class PostProcess:
    """Clean-up of probability maps and fused label maps.

    Args:
        ops: option names (see ``POSTPROCESS_OPTIONS``), any order.
        num_classes: classes including background (label values ``0..num_classes-1``).
        on_probabilities: ``median`` filters the probabilities (mean fusion) when True, the one-hot
            label map (vote / STAPLE fusion) when False.
        radius: median filter radius in voxels (1: 3x3 / 3x3x3).
        max_voxels: kept for compatibility; the median filter (scipy) holds no shifted copies.
    """

    def __init__(
        self,
        ops: str | Sequence[str] | None,
        num_classes: int,
        on_probabilities: bool = True,
        radius: int = 1,
        max_voxels: int = 2**21,
    ) -> None:
        self.ops = parse_postprocess(ops)
        self.num_classes, self.on_probabilities = int(num_classes), on_probabilities
        self.radius, self.max_voxels = int(radius), int(max_voxels)
        labels = list(range(1, self.num_classes))
        # face-connected components (as nnU-Net); holes as background not reaching the border through
        # any neighbour (full connectivity), the complementary choice, so a filled mask has no hole
        self.largest = KeepLargestConnectedComponent(labels, is_onehot=False, independent=True, connectivity=1)
        self.fill = FillHoles(applied_labels=labels)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def smooth(self, probs: Tensor) -> Tensor:
        """Median-filtered class probabilities ``[K, *spatial]``, renormalised to sum to 1 (unchanged
        unless ``median`` is on and ``on_probabilities``)."""
        if "median" not in self.ops or not self.on_probabilities:
            return probs
        probs = _plain(probs).float()
        out = torch.stack([self._median(p) for p in probs])
        total = out.sum(0, keepdim=True)
        # where every class's median is 0 (a perfect tie of hard votes) keep the unfiltered values
        return torch.where(total > 1e-6, out / total.clamp_min(1e-6), probs)

    def select(self, probs: Tensor, smoothed: Tensor, keep: Tensor | None = None) -> Tensor:
        """``confident_component``: class probabilities ``[K, *spatial]`` in which each foreground class
        keeps its unfiltered probability inside its most confident candidate region and 0 elsewhere;
        background keeps ``smoothed``. Renormalised; ``smoothed`` unchanged without the option.
        ``keep [*spatial]``: voxels the annotator fixed (their class, -1 elsewhere): a candidate region of
        class c holding a voxel fixed as c is kept too (a foreground click on a missed region).

        Written here: MONAI's component transforms rank components by size, not by probability; scipy
        labels the components and averages the probability over each.
        """
        if "confident_component" not in self.ops or not self.on_probabilities:
            return smoothed
        raw, out = _plain(probs).float(), _plain(smoothed).float().clone()
        face = ndimage.generate_binary_structure(raw.ndim - 1, 1)
        for c in range(1, raw.shape[0]):
            p = raw[c].numpy()
            regions, n = ndimage.label(p >= CANDIDATE_FLOOR, structure=face)
            if n:
                index = np.arange(1, n + 1)
                means = np.asarray(ndimage.mean(p, regions, index))
                means[np.asarray(ndimage.maximum(p, regions, index)) < MIN_PEAK] = -1.0
                best = int(means.argmax())
                chosen = [best + 1] if means[best] >= MIN_MEAN else []
                if keep is not None:
                    chosen += np.unique(regions[(_plain(keep) == c).numpy() & (regions > 0)]).tolist()
                kept = torch.from_numpy(np.isin(regions, chosen))
            else:
                kept = torch.zeros(p.shape, dtype=torch.bool)
            out[c] = torch.where(kept, raw[c], 0.0)
        return out / out.sum(0, keepdim=True).clamp_min(1e-6)

    def clean(self, label: Tensor, median: bool = True) -> Tensor:
        """Cleaned label map ``[*spatial]`` (same shape and dtype as ``label``).

        Args:
            label: integer label map ``[*spatial]`` (no channel axis).
            median: apply the label-map median (vote / STAPLE fusion) if the options ask for it; off
                for a second pass on an already filtered mask (e.g. after resampling).
        """
        if not self.ops:
            return label
        x = _plain(label)[None].long()
        if median and "median" in self.ops and not self.on_probabilities:
            onehot = torch.stack([(x[0] == c).float() for c in range(self.num_classes)])
            x = torch.stack([self._median(p) for p in onehot]).argmax(0, keepdim=True)
        if "largest_component" in self.ops:
            x = _plain(self.largest(x))
        if "fill_holes" in self.ops:
            filled = _plain(self.fill(x.clone()))
            x = torch.where(x == 0, filled, x)  # FillHoles alone would also overwrite other labels inside
        return x[0].to(label.dtype)

    def _median(self, channel: Tensor) -> Tensor:
        """Median filter of one map ``[*spatial]`` (``2 * radius + 1`` wide, borders replicated): equal,
        value for value, to MONAI's ``MedianSmooth`` (tested), computed by scipy's ``median_filter``,
        which needs no stack of ``(2r+1)^d`` shifted copies: 1.9x faster on a 261x261x180 map."""
        size = 2 * self.radius + 1
        return torch.from_numpy(ndimage.median_filter(_plain(channel).float().numpy(), size=size, mode="nearest"))


def _plain(x) -> Tensor:
    """A plain ``torch.Tensor`` (MONAI transforms return ``MetaTensor``)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
