"""Atomic writing of images and JSON: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_nifti(array: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write ``[1, *spatial]`` or ``[*spatial]`` with a RAS ``affine`` (MONAI's convention) as NIfTI."""
    arr = np.asarray(torch.as_tensor(array).detach().cpu())
    if arr.ndim in (3, 4) and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    aff = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    if aff.shape == (3, 3):  # 2D affine -> 3D
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = aff[:2, :2], aff[:2, 2]
        aff = full
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm")
    return _atomic(Path(path), lambda tmp: nib.save(img, tmp))


def write_json(data: Any, path: str | Path) -> Path:
    text = json.dumps(data, indent=2, default=_plain)
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def _plain(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
