"""Checks of image and label files before they are stored or used: one clear ``InputError`` for what
would fail later (or, worse, silently train on garbage), and a bound on what is read, so that one
file cannot exhaust the memory of a server that takes uploads from anywhere.

Files are read by the readers of training and inference (``transforms.load_transforms``: nibabel for
NIfTI, which notices a truncated file, where SimpleITK fills the missing voxels with zeros). No
``monailabel`` import: the app's datastore, the app's infer tasks and the CLI share these checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from .errors import InputError
from .transforms import MAX_VOXELS, binary_255_as_01, load_transforms, same_grid

__all__ = ["MAX_VOXELS", "check_image_file", "check_image_size", "check_label_file", "header_shape", "read_files", "same_grid"]


def header_shape(path: str | Path) -> tuple[int, ...] | None:
    """Voxels per axis (components last, when more than one) from the file header only, without
    reading or decompressing any voxel; None when no header reader knows the file."""
    name = str(path).lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return tuple(int(s) for s in nib.load(str(path)).shape)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shape = tuple(int(s) for s in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
        return shape + ((components,) if components > 1 else ())
    except Exception:  # no header reader for this file: the full read reports what is wrong
        return None


def check_image_size(path: str | Path, max_voxels: int = MAX_VOXELS) -> None:
    """``InputError`` if the header declares more than ``max_voxels`` values (before any is read)."""
    shape = header_shape(path)
    if shape is not None and math.prod(shape) > max_voxels:
        raise InputError(
            f"image too large: {Path(path).name} has {shape} = {math.prod(shape):,} voxels, more than the "
            f"{max_voxels:,} this server reads; crop or downsample it"
        )


def read_files(
    path: str | Path | Sequence[str | Path], key: str, label_names: Mapping[str, int] | None = None
) -> MetaTensor:
    """Read one file (or one file per channel) channel first with the pipeline's readers
    (``transforms.load_transforms``, so 2D pictures load as in training); ``InputError`` if a file
    is missing, empty, too large by its header (never read then) or unreadable."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise InputError(f"no {key} file given")
    for p in paths:
        if not p.is_file():
            raise InputError(f"{key} not found: {p}")
        if p.stat().st_size == 0:
            raise InputError(f"{key} file {p.name} is empty (0 bytes)")
        check_image_size(p)
    names = [str(p) for p in paths]
    try:
        return Compose(load_transforms([key], label_names=label_names))({key: names if len(names) > 1 else names[0]})[key]
    except Exception as e:  # readers raise many types for a broken file
        cause = e.__cause__ or e
        raise InputError(f"cannot read {key} {', '.join(names)}: {str(cause).splitlines()[0][:200]}") from e


def check_image_file(path: str | Path, channels: int | None = 1) -> MetaTensor:
    """Read an image as inference and training will, and refuse what they cannot use: unreadable or
    truncated files, 1D / 4D+ data, another number of channels than ``channels`` (None: any), fewer
    than 8 voxels, no finite voxel. Returns the image ``[C, *spatial]``."""
    img = read_files(path, "image")
    spatial = tuple(img.shape[1:])
    if len(spatial) not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got {len(spatial)} spatial dimensions {spatial}")
    if channels is not None and img.shape[0] != channels:
        raise InputError(
            f"the image has {img.shape[0]} channels or volumes (a 4D or multi-channel file, shape "
            f"{tuple(img.shape)}); the model takes {channels}: send one {len(spatial)}D image"
        )
    if math.prod(spatial) < 8:
        raise InputError(f"image too small: {spatial}")
    if not bool(torch.isfinite(img).any()):
        raise InputError("the image has no finite voxel (all NaN / Inf)")
    return img


def check_label_file(
    label: str | Path,
    image: str | Path | MetaTensor,
    max_value: int | None = None,
    label_names: Mapping[str, int] | None = None,
) -> dict:
    """Check a label map against its image: readable, one layer, the image's grid (shape and affine),
    whole non-negative values up to ``max_value`` (None: no upper bound). A 0/255 mask counts as 0/1,
    as training reads it. Returns ``{"values": [...non-zero values], "foreground_voxels": n}``.

    ``label_names`` maps the segments of a 3D Slicer ``.seg.nrrd`` to values by name.
    """
    img = image if isinstance(image, MetaTensor) else read_files(image, "image")
    lab = read_files(label, "label", label_names)
    if lab.shape[0] != 1:
        raise InputError(f"the label has {lab.shape[0]} layers; send one label map (one value per voxel)")
    if tuple(lab.shape[1:]) != tuple(img.shape[1:]):
        raise InputError(f"label shape {tuple(lab.shape[1:])} does not match the image's {tuple(img.shape[1:])}")
    if not same_grid(lab.affine, img.affine):
        raise InputError(
            "label geometry (origin / spacing / direction) does not match the image's: export the label on the "
            "image's grid"
        )
    values = torch.unique(lab.as_tensor())
    if not bool(torch.isfinite(values).all()):
        raise InputError("the label has NaN / Inf values")
    if bool((values != values.round()).any()):
        odd = [float(v) for v in values if v != v.round()][:5]
        raise InputError(f"label values must be whole numbers, found {odd}")
    values = torch.unique(binary_255_as_01(values))
    bad = [int(v) for v in values if v < 0 or (max_value is not None and v > max_value)]
    if bad:
        allowed = f"0..{max_value}" if max_value is not None else "values >= 0"
        raise InputError(f"label values {bad[:10]} are outside the label set ({allowed})")
    fg = int((lab.as_tensor() != 0).sum())
    return {"values": [int(v) for v in values if v != 0], "foreground_voxels": fg}
