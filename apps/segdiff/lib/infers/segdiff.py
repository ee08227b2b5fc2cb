"""Infer tasks: ``segdiff`` (fused label map + per-label uncertainty statistics) and
``segdiff_uncertainty`` (the voxels above an uncertainty threshold as one "uncertain" segment, or the
float uncertainty map itself with ``{"output_map": true}``).

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
import torch
from monailabel.interfaces.exception import MONAILabelError
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import device_list, file_ext

from monai_segdiff.busy import BusyMarker
from monai_segdiff.io import is_picture
from monai_segdiff.report import finite

from ..model import CachedPrediction, ImageNotFoundError, SegDiffAppError, SegDiffModel

logger = logging.getLogger(__name__)

# Bounds of one interactive request: MONAI Label answers infer requests one at a time, so one request
# for 1000 members x 1000 steps would hold every annotator's request for hours.
MAX_SAMPLES = 32
MAX_STEPS = 100


class BadOptionError(SegDiffAppError):
    """An infer option value that cannot be used (HTTP 422, the reason in the body)."""

    status_code = 422
    code = MONAILabelError.INVALID_INPUT


def count_option(data: dict[str, Any], key: str, maximum: int) -> int | None:
    """A whole number in ``1..maximum``; 0, "" or absent -> None, the model's default (Slicer sends the
    config's 0 for "the model's"). Anything else -> `BadOptionError`."""
    value = data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number == 0:
        return None
    if not (number.is_integer() and 1 <= number <= maximum):
        raise BadOptionError(f"{key} must be a whole number in 1..{maximum} (0: the model's default), got {value!r}")
    return int(number)


def check_device(device: Any) -> str:
    """``device`` if torch can run on it here; else `BadOptionError`."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        d = None
    cuda = d is not None and d.type == "cuda" and torch.cuda.is_available()
    usable = d is not None and (d.type == "cpu" or (cuda and (d.index or 0) < torch.cuda.device_count()))
    if not usable:
        raise BadOptionError(f"device must be one of {', '.join(device_list())}, got {device!r}")
    return str(device)


def truthy(value: Any) -> bool:
    """``True``, ``"true"``, ``"1"``, ``1`` ... -> True; anything else (incl. None, "") -> False."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def busy_marker(model: SegDiffModel) -> BusyMarker:
    """The marker interactive infers of ``model`` hold and its scoring waits on: keyed by the model's own
    path, which the server and its scoring subprocess compute alike from the same ``--conf``."""
    return BusyMarker(model.own_path)


def devices(first: str) -> list[str]:
    """Device choices for the config (Slicer sends the first one)."""
    return [first] + [d for d in device_list() if d != first]


def image_dims(model: SegDiffModel) -> int:
    """MONAI Label's ``dimension`` of the served model: 2 if it was trained on 2D images, else 3."""
    cfg = model.config()
    return cfg.image_dims if cfg is not None else 3


def affine_2d_to_3d(affine: np.ndarray) -> np.ndarray:
    """A 2D image's 3x3 affine as the 4x4 affine of a one-slice volume: MONAI Label's writer drops the
    affine of a 2D result, so a 2D NIfTI / NRRD answer is written as one slice on the image's grid."""
    full = np.eye(4)
    full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
    return full


def result_extension(image: str) -> str:
    """The answer's file type: the image's, but PNG for any 2D picture (a JPG mask would be lossy)."""
    return ".png" if is_picture(image) else (file_ext(image) or ".nii.gz")


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
        with busy_marker(self.model).hold():  # background scoring pauses between images meanwhile
            pred, cached = self.model.predict(image, samples=samples, steps=steps, device=check_device(device))
        data.setdefault("result_extension", result_extension(image))
        data["result"] = finite(self.result_json(pred, cached))
        out, affine = self.output(pred, data), pred.affine
        if out.ndim == 2 and not is_picture(image):  # MONAI Label's writer drops a 2D result's geometry
            out, affine = out[..., None], affine_2d_to_3d(affine) if affine.shape == (3, 3) else affine
        data["pred_meta_dict"] = {"affine": affine}
        data[self.output_label_key] = out
        return data

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
        output_map = truthy(data.get("output_map"))
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
