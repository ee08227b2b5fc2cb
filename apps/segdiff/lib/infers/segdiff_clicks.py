"""Infer task ``segdiff_clicks`` (MONAI Label type ``deepedit``): correction with clicks in 3D Slicer.

3D Slicer's MONAI Label module lists a ``deepedit`` model in its point-click section and sends, with
every click, all clicks so far: one list of voxel indices per label name (multi-label mode), or
``foreground`` / ``background`` lists and the segment's ``label``. The ensemble is resampled holding
each click's neighbourhood at its label (``monai_segdiff.clicks``); a slice model reruns only the
clicked slices and reuses the image's plain ensemble, so a click costs a fraction of an Auto
Segmentation. A request may also carry the annotator's current label (``label`` upload): its voxels
of the segments named in ``final`` (default: every segment), or every voxel of the slices listed in
``slices`` (indices along the image's last axis), are kept and the rest is resampled consistent with them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monai_segdiff.clicks import parse_clicks
from monai_segdiff.errors import InputError
from monai_segdiff.io import load_label

from ..model import CachedPrediction, SegDiffModel, answered
from .options import BadOptionError
from .segdiff import SegDiffInfer


class SegDiffClicksInfer(SegDiffInfer):
    """Re-segmentation that follows the annotator's clicks and partial labels (see the module doc).

    Result JSON: as ``segdiff``, plus ``interaction`` (clicks, held voxels, recomputed slices)."""

    def __init__(self, model: SegDiffModel, description: str = "Correct with clicks: the diffusion ensemble "
                 "resampled holding every click (and any final segments or slices of the current label)"):
        super().__init__(model, description)
        self.type = InferType.DEEPEDIT

    def predict(self, image: str, data: dict[str, Any], samples: int | None, steps: int | None,
                device: str) -> tuple[CachedPrediction, bool]:
        names = self.model.label_names()
        with answered():
            clicks = parse_clicks(data, names)
            known = self.known(data.get("label"), data, names)
            if not clicks and known is None:
                raise InputError("no clicks: place foreground / background points on the image "
                                 "(or send the current label with 'final' segments or 'slices')")
            return self.model.correct(image, clicks=clicks, known=known, samples=samples, steps=steps, device=device)

    def output(self, pred: CachedPrediction, data: dict[str, Any]) -> np.ndarray:
        """The whole label map (multi-label mode); in single-label mode (a ``foreground`` list: multi-label
        requests carry one list per label name instead) the clicked segment alone as value 1, which is how
        the plugin imports it."""
        out = super().output(pred, data)
        name = str(data.get("label") or "")
        names = self.model.label_names()
        if "foreground" in data and names.get(name, 0) > 0:
            self.labels = {name: 1}
            return (out == names[name]).astype(np.uint8)
        return out

    @staticmethod
    def known(path: Any, data: dict[str, Any], names: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(label, mask)`` of the uploaded label's final voxels, or None without an upload (``label`` is then
        the clicked segment's name, as the plugin sends it; MONAI Label puts an upload's file path there)."""
        if not isinstance(path, str) or not os.path.isfile(path):
            return None
        try:
            label = load_label(path, label_names=names).as_tensor().long()[:1]
        except InputError:
            raise
        except Exception as e:  # an unreadable upload is the client's error, not the server's
            raise BadOptionError(f"cannot read the uploaded label: {str(e).splitlines()[0][:200]}") from e
        final, slices = data.get("final"), data.get("slices")
        if slices not in (None, "", []):
            if not isinstance(slices, list) or not all(isinstance(z, int) and 0 <= z < label.shape[-1] for z in slices):
                raise BadOptionError(f"slices must be a list of slice indices in 0..{label.shape[-1] - 1}, got {slices!r}")
            mask = torch.zeros_like(label, dtype=torch.bool)
            mask[..., slices] = True
        else:
            wanted = names if final in (None, "", []) else final
            if not isinstance(wanted, (list, dict)) or any(str(n) not in names for n in wanted):
                raise BadOptionError(f"final must list label names of this model ({', '.join(names)}), got {final!r}")
            values = [names[str(n)] for n in wanted if names[str(n)] > 0]
            mask = torch.isin(label, torch.tensor(values or [-1]))
        return label, mask
