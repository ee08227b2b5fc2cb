"""Infer tasks: ``segdiff`` (fused label map + per-label uncertainty statistics) and
``segdiff_uncertainty`` (the voxels above an uncertainty threshold as one "uncertain" segment, or the
float uncertainty map itself with ``{"output_map": true}``).

Both answer from the same cached ensemble when they are asked about the same image, model file and
settings, so running the uncertainty model after Auto Segmentation costs no second sampling run.
The image is loaded by the library's `Segmenter`, never by MONAI transforms on the request dict, so
MONAI 1.6.1's ``Spacingd`` never sees the string ``image_path`` (see DESIGN.md).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import device_list, file_ext

from ..model import CachedPrediction, ImageNotFoundError, SegDiffModel, plain

logger = logging.getLogger(__name__)


def _positive_int(value: Any) -> int | None:
    """Request values come as int, str or "" (Slicer sends 0 / "" for an empty field): <= 0 -> None."""
    try:
        value = int(float(value))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def truthy(value: Any) -> bool:
    """``True``, ``"true"``, ``"1"``, ``1`` ... -> True; anything else (incl. None, "") -> False."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def devices(first: str) -> list[str]:
    """Device choices for the config (Slicer sends the first one)."""
    return [first] + [d for d in device_list() if d != first]


class SegDiffInfer(BasicInferTask):
    """Diffusion-ensemble segmentation with per-label uncertainty statistics in the result JSON.

    Result JSON (besides MONAI Label's ``label_names`` and ``latencies``): ``uncertainty_stats``
    (per label: ``volume_ml``, ``mean_uncertainty``, ``uncertain_volume_ml``, ``sample_agreement``),
    ``case_score``, ``uncertainty_measure``, ``samples``, ``steps``, ``model_ts``, ``cached``.

    Args:
        model: the served model file.
        description: shown in ``/info``.
    """

    def __init__(self, model: SegDiffModel, description: str = "Diffusion segmentation ensemble with uncertainty"):
        self.model = model
        super().__init__(
            path=model.path,
            network=None,
            type=InferType.SEGMENTATION,
            labels=model.label_names(),
            dimension=3,
            description=description,
            config={
                "device": devices(model.device),
                "samples": int(model.samples or 0),  # 0: the model's default ensemble size
                "steps": int(model.steps or 0),  # 0: the model's default sampling steps
            },
        )

    # -- MONAI Label hooks ----------------------------------------------------------------------
    def is_valid(self) -> bool:
        # Always listed: without a model file an infer answers 404 "train one first" instead of the
        # model silently missing from Slicer's list.
        return True

    def info(self) -> dict[str, Any]:
        self.labels = self.current_labels()
        return super().info()

    def current_labels(self) -> dict[str, int]:
        return self.model.label_names()

    def pre_transforms(self, data=None):
        return []  # the Segmenter loads and preprocesses the image itself

    def post_transforms(self, data=None):
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu"):
        image = data.get("image")
        if not isinstance(image, str) or not image:
            raise ImageNotFoundError("this model needs an image file (a datastore image id or an uploaded file)")
        pred, cached = self.model.predict(
            image, samples=_positive_int(data.get("samples")), steps=_positive_int(data.get("steps")), device=device
        )
        data.setdefault("result_extension", file_ext(image) or ".nii.gz")
        data["pred_meta_dict"] = {"affine": pred.affine}
        data["result"] = plain(self.result_json(pred, cached))
        data[self.output_label_key] = self.output(pred, data)
        return data

    # -- what this model returns ----------------------------------------------------------------
    def output(self, pred: CachedPrediction, data: dict[str, Any]) -> np.ndarray:
        self.labels = pred.stats.get("label_names") or self.current_labels()
        return pred.label[0].cpu().numpy().astype(np.uint8)

    def result_json(self, pred: CachedPrediction, cached: bool) -> dict[str, Any]:
        s = pred.stats
        return {
            "uncertainty_stats": s.get("labels", {}),
            "case_score": s.get("case_score"),
            "uncertainty_measure": s.get("uncertainty"),
            "uncertainty_threshold": self.model.threshold,
            "samples": s.get("samples"),
            "steps": s.get("steps"),
            "network": s.get("network"),
            "model_ts": pred.model_ts,
            "cached": cached,
            "timings": s.get("timings", {}),
        }


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

    def threshold(self, data: dict[str, Any]) -> float:
        try:
            t = float(data.get("uncertainty_threshold", self.model.threshold))
        except (TypeError, ValueError):
            return self.model.threshold
        return t if 0.0 < t < 1.0 else self.model.threshold

    def output(self, pred: CachedPrediction, data: dict[str, Any]) -> np.ndarray:
        self.labels = self.current_labels()
        u = pred.uncertainty[0].cpu().numpy().astype(np.float32)
        t = self.threshold(data)
        mask = u > t
        voxel_ml = abs(float(np.linalg.det(pred.affine[:3, :3]))) / 1000.0
        output_map = truthy(data.get("output_map"))
        data["result"].update(
            {
                "uncertainty_threshold": t,
                "uncertain_voxels": int(mask.sum()),
                "uncertain_volume_ml": float(mask.sum()) * voxel_ml,
                "output": "uncertainty_map" if output_map else "label",
            }
        )
        return u if output_map else mask.astype(np.uint8)
