"""Infer task ``segdiff``: fused label map + per-label uncertainty statistics (``segdiff_uncertainty``,
the "uncertain" segment, in ``segdiff_uncertainty.py``).

Both answer from the same cached ensemble when they are asked about the same image, model file and
settings, so running the uncertainty model after Auto Segmentation costs no second sampling run.
The image is loaded by the library's `Segmenter`, never by MONAI transforms on the request dict, so
MONAI 1.6.1's ``Spacingd`` never sees the string ``image_path`` (see DESIGN.md).

While an infer computes, it holds the served model's `BusyMarker` (`busy_marker`): the scoring
subprocess waits between images until no infer runs, so an Auto Segmentation keeps the CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_segdiff.io import is_picture
from monai_segdiff.values import affine_4x4, finite

from ..model import CachedPrediction, ImageNotFoundError, SegDiffModel
from .options import (
    MAX_SAMPLES,
    MAX_STEPS,
    busy_marker,
    check_device,
    count_option,
    devices,
    image_dims,
    result_extension,
)

logger = logging.getLogger(__name__)

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
            dimension=image_dims(model),  # 2: 2D images (PNG/JPG/2D NIfTI) answered with a 2D mask
            description=description,
            config={
                "device": devices(model.device),
                "samples": int(model.samples or 0),  # 0: the model's default ensemble size
                "steps": int(model.steps or 0),  # 0: the model's default sampling steps
            },
        )

    # -- MONAI Label hooks ----------------------------------------------------------------------
    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """MONAI Label's writer, with the result moved out of the shared temp folder: the server deletes
        the file it sent, and a ``MONAILabelClient`` on this machine saves its copy under the same name in
        that same folder by default, so the copy could vanish (seen with the default client)."""
        output_file, result = super().writer(data, extension=extension, dtype=dtype)
        if isinstance(output_file, str) and os.path.isfile(output_file):
            user = os.getuid() if hasattr(os, "getuid") else "user"  # one folder per user, never removed
            folder = os.path.join(tempfile.gettempdir(), f"segdiff-results-{user}")
            os.makedirs(folder, exist_ok=True)
            moved = os.path.join(folder, os.path.basename(output_file))
            os.replace(output_file, moved)
            output_file = moved
        return output_file, result

    def is_valid(self) -> bool:
        # Always listed: without a model file an infer answers 404 "train one first" instead of the
        # model silently missing from Slicer's list.
        return True

    def info(self) -> dict[str, Any]:
        self.labels = self.current_labels()
        self.dimension = image_dims(self.model)
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
        samples, steps = self.check_options(data)
        device = check_device(device)
        with busy_marker(self.model).hold():  # background scoring pauses between images meanwhile
            pred, cached = self.predict(image, data, samples, steps, device)
        data.setdefault("result_extension", result_extension(image))
        data["result"] = finite(self.result_json(pred, cached))
        out, affine = self.output(pred, data), pred.affine
        if out.ndim == 2 and not is_picture(image):  # MONAI Label's writer drops a 2D result's geometry
            out, affine = out[..., None], affine_4x4(affine)
        data["pred_meta_dict"] = {"affine": affine}
        data[self.output_label_key] = out
        return data

    def predict(self, image: str, data: dict[str, Any], samples: int | None, steps: int | None,
                device: str) -> tuple[CachedPrediction, bool]:
        """The prediction this task answers with: ``(prediction, cached)``."""
        return self.model.predict(image, samples=samples, steps=steps, device=device)

    def check_options(self, data: dict[str, Any]) -> tuple[int | None, int | None]:
        """Validate the request's options before any work; ``(samples, steps)`` (None: the model's)."""
        return count_option(data, "samples", MAX_SAMPLES), count_option(data, "steps", MAX_STEPS)

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
            "coverage": self.model.coverage(),
            **({"interaction": s["interaction"]} if "interaction" in s else {}),
        }
