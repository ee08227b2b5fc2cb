"""Reading images and labels as the pipeline does, and writing images and JSON atomically: a reader
never sees a half-written file.

NIfTI for volumes and on request; PNG for 2D label maps (label values 0..K, one gray byte per pixel,
the layout of ``labels/final``) and for uncertainty heat maps (a matplotlib colour map, RGB); Slicer
``.seg.nrrd`` through :mod:`monai_segdiff.slicer_io`. ``atomic_write`` / ``copy_atomic`` live in
:mod:`monai_segdiff.atomic` (importable from here too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, PILWriter

from .atomic import atomic_write, copy_atomic  # noqa: F401  (copy_atomic: importable from here too)
from .slicer_io import write_seg_nrrd
from .transforms import binary_255_as_01
from .validation import read_files
from .values import affine_4x4

ImageFiles = str | Path | Sequence[str | Path]  # one file, or one file per channel


def load_image(path: ImageFiles) -> MetaTensor:
    """Read an image channel first, float32: any format MONAI's ``LoadImaged`` reads (PNG/JPG through
    ``PILReader``: RGB -> 3 channels); several files (one per channel, same grid) are stacked as
    channels. ``InputError`` if missing or unreadable."""
    return read_files(path, "image")


def load_label(path: str | Path, label_names: dict[str, int] | None = None) -> MetaTensor:
    """Read a label map ``[1, *spatial]`` (pictures keep their pixel values; 0/255 masks -> 0/1; Slicer
    ``.seg.nrrd`` segments get the values of ``label_names`` by name)."""
    lab = read_files(path, "label", label_names)
    return MetaTensor(binary_255_as_01(lab.round().as_tensor()), meta=lab.meta)


def write_nifti(array: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write ``[1, *spatial]`` or ``[*spatial]`` with a RAS ``affine`` (MONAI's convention) as NIfTI."""
    arr = np.asarray(torch.as_tensor(array).detach().cpu())
    if arr.ndim in (3, 4) and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    img = nib.Nifti1Image(arr, affine_4x4(affine))
    img.header.set_xyzt_units("mm")
    return atomic_write(Path(path), lambda tmp: nib.save(img, tmp))


def write_png(array: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write a 2D ``[1, X, Y]`` / ``[X, Y]`` label map or an RGB ``[3, X, Y]`` picture (uint8) as PNG.

    Arrays use MONAI's (x, y) axis order; MONAI's ``PILWriter`` swaps them back, so the PNG matches a
    picture read by ``PILReader`` pixel for pixel.
    """
    arr = np.asarray(torch.as_tensor(array).detach().cpu())
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"write_png needs [1, X, Y] or [3, X, Y], got {arr.shape}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"write_png needs values in 0..255, got {arr.min()}..{arr.max()}")
    writer = PILWriter(output_dtype=np.uint8, scale=None)
    writer.set_data_array(np.rint(arr).astype(np.uint8), channel_dim=0)
    return atomic_write(Path(path), lambda tmp: writer.write(tmp, format="PNG"))


def heatmap_rgb(values: torch.Tensor | np.ndarray, cmap: str = "inferno", vmax: float = 1.0) -> np.ndarray:
    """``[1, X, Y]`` / ``[X, Y]`` values in ``[0, vmax]`` -> ``[3, X, Y]`` uint8 colours of a matplotlib map."""
    from matplotlib import colormaps  # lazy: matplotlib (~0.3 s) only for 2D heat maps

    arr = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64)
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"a heat map needs a 2D map, got shape {arr.shape}")
    rgba = colormaps[cmap](np.clip(np.nan_to_num(arr) / vmax, 0.0, 1.0), bytes=True)
    return np.moveaxis(rgba[..., :3], -1, 0)


def write_heatmap(values: torch.Tensor | np.ndarray, path: str | Path, cmap: str = "inferno") -> Path:
    """A 2D uncertainty map in [0, 1] as an RGB heat-map PNG (dark: certain, bright: uncertain)."""
    return write_png(heatmap_rgb(values, cmap), path)


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def is_picture(path: str | Path) -> bool:
    """A 2D picture format (read by ``PILReader``)."""
    return str(path).lower().endswith(PICTURE_SUFFIXES)


def write_prediction(
    label: torch.Tensor, uncertainty: torch.Tensor, folder: str | Path, name: str, picture: bool = False,
    nifti: bool = False, cmap: str = "inferno", seg_nrrd: dict[str, int] | None = None,
) -> dict[str, Path]:
    """The files of one prediction in ``folder``, by kind (``seg``, ``uncertainty``, ``heatmap``, ...).

    Volumes and 2D NIfTI: ``<name>_seg.nii.gz`` and ``<name>_uncertainty.nii.gz`` (float map).
    2D pictures (``picture``): ``<name>_seg.png`` (label values 0..K); the NIfTI pair too with ``nifti``.
    Every 2D image: ``<name>_uncertainty.png``, the uncertainty map as a ``cmap`` heat map.
    ``label`` / ``uncertainty`` are ``[1, *spatial]`` MetaTensors (their ``affine`` goes to NIfTI).
    ``seg_nrrd`` (label names ``{name: value}``): also ``<name>.seg.nrrd``, a 3D Slicer segmentation.
    """
    folder = Path(folder)
    files: dict[str, Path] = {}
    two_d = label.ndim - 1 == 2
    if picture and two_d:
        files["seg_png"] = write_png(label, folder / f"{name}_seg.png")
    if nifti or not (picture and two_d):
        files["seg"] = write_nifti(label, label.affine, folder / f"{name}_seg.nii.gz")
        files["uncertainty"] = write_nifti(uncertainty, uncertainty.affine, folder / f"{name}_uncertainty.nii.gz")
    if two_d:
        files["heatmap"] = write_heatmap(uncertainty, folder / f"{name}_uncertainty.png", cmap)
    if seg_nrrd is not None:
        files["seg_nrrd"] = write_seg_nrrd(label, label.affine, folder / f"{name}.seg.nrrd", seg_nrrd)
    return files


def write_json(data: Any, path: str | Path) -> Path:
    text = json.dumps(data, indent=2, default=_plain)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _plain(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
