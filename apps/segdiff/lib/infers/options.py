"""Options of the infer tasks: bounds, checks and small conversions (HTTP 422 for a bad value)."""

from __future__ import annotations

from typing import Any

import torch
from monailabel.interfaces.exception import MONAILabelError
from monailabel.utils.others.generic import device_list, file_ext

from monai_segdiff.busy import BusyMarker
from monai_segdiff.io import is_picture

from ..model import SegDiffAppError, SegDiffModel

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


def result_extension(image: str) -> str:
    """The answer's file type: the image's, but PNG for any 2D picture (a JPG mask would be lossy)."""
    return ".png" if is_picture(image) else (file_ext(image) or ".nii.gz")


