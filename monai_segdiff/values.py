"""Small conversions every layer uses: JSON-safe numbers, request flags, a 2D affine as a 3D one.

Written here once (not in MONAI): ``finite`` because strict JSON (and FastAPI) refuses NaN; ``flag``
around MONAI's ``str2bool``, which takes only strings and bools (JSON requests also send 0 / 1 and None);
``affine_4x4`` because a 2D image's 3x3 affine has to become a one-slice volume's 4x4 for NIfTI, NRRD
and MONAI Label's writer alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.utils import str2bool

__all__ = ["finite", "flag", "affine_4x4"]


def finite(value: Any) -> Any:
    """A copy of nested dicts / lists / tuples with NaN and infinities replaced by ``None`` (strict JSON
    has no NaN), numpy and torch scalars turned into Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flag(value: Any) -> bool:
    """A yes/no option from a request or a command line: ``True``, ``"true"``, ``"yes"``, ``"1"``, ``1``,
    ``"on"`` -> True; anything else (``None``, ``""``, ``"false"``, unknown words) -> False."""
    if isinstance(value, str) and value.strip().lower() == "on":
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return str2bool(value.strip() if isinstance(value, str) else value, default=False, raise_exc=False)


def affine_4x4(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """``affine`` as a float64 4x4 matrix; a 2D image's 3x3 affine becomes that of a one-slice volume
    (same in-plane axes and origin, unit slice spacing)."""
    aff = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    if aff.shape == (3, 3):
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = aff[:2, :2], aff[:2, 2]
        return full
    return aff
