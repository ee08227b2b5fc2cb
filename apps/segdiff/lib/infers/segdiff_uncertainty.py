"""Infer task ``segdiff_uncertainty``: the voxels above an uncertainty threshold as one "uncertain"
segment, or the float uncertainty map itself with ``{"output_map": true}``, from the ensemble ``segdiff``
computed (shared cache)."""

from __future__ import annotations

from typing import Any

import numpy as np

from monai_segdiff.io import is_picture
from monai_segdiff.values import flag

from ..model import CachedPrediction, SegDiffModel
from .options import BadOptionError
from .segdiff import SegDiffInfer


class SegDiffUncertaintyInfer(SegDiffInfer):
    """Where the model is unsure: voxels with uncertainty > ``uncertainty_threshold`` as the segment
    "uncertain" (value 1). Request ``{"output_map": true}`` to get the float uncertainty map in [0, 1]
    (float32, same grid as the image) as the result file instead, for clients that display it as a
    volume (it is not a label map: do not import it as segments).

    Reuses the ensemble of a previous ``segdiff`` (or ``segdiff_uncertainty``) call on the same image,
    model file and settings from the shared cache.
    """

    LABEL = "uncertain"

    def __init__(self, model: SegDiffModel, description: str = "Voxels where the diffusion ensemble is uncertain"):
        super().__init__(model, description)
        self._config.update({"uncertainty_threshold": float(model.threshold), "output_map": False})

    def current_labels(self) -> dict[str, int]:
        return {self.LABEL: 1}

    def check_options(self, data: dict[str, Any]) -> tuple[int | None, int | None]:
        self.threshold(data)
        return super().check_options(data)

    def threshold(self, data: dict[str, Any]) -> float:
        value = data.get("uncertainty_threshold")
        if value is None or value == "":
            return self.model.threshold
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = float("nan")
        if not 0.0 < t < 1.0:
            raise BadOptionError(f"uncertainty_threshold must be a number in (0, 1), got {value!r}")
        return t

    def output(self, pred: CachedPrediction, data: dict[str, Any]) -> np.ndarray:
        self.labels = self.current_labels()
        u = pred.uncertainty[0].cpu().numpy().astype(np.float32)
        t = self.threshold(data)
        mask = u > t
        voxel_ml = abs(float(np.linalg.det(pred.affine[:3, :3]))) / 1000.0
        output_map = flag(data.get("output_map"))
        if output_map and is_picture(f"x{data.get('result_extension', '')}"):
            data["result_extension"] = ".nii.gz"  # a float map does not fit in a PNG
        data["result"].update(
            {
                "uncertainty_threshold": t,
                "uncertain_voxels": int(mask.sum()),
                "uncertain_volume_ml": float(mask.sum()) * voxel_ml,
                "output": "uncertainty_map" if output_map else "label",
            }
        )
        return u if output_map else mask.astype(np.uint8)
