"""Keep submitted labels consistent with the model's label values.

3D Slicer exports the segments of a submitted label with values 1, 2, ... in segment order and sends
their names as ``label_info`` (``[{"name": ..., "idx": ...}, ...]``, in that order). The order is the
user's: an extra segment (e.g. the "uncertain" segment of the ``segdiff_uncertainty`` model) or a
reordered list would silently turn into wrong training labels. :func:`remap_label_file` rewrites a
saved label so every value means the model's label of that name, and unknown names become background.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def value_mapping(label_info: list[dict[str, Any]], label_names: dict[str, int]) -> dict[int, int]:
    """``{value in the file: model value}`` for the segments described by ``label_info``.

    The i-th entry of ``label_info`` has value i + 1 in the file (Slicer's sequential export; its
    ``idx`` field counts skipped "background"/scribble segments too, so the position is used). Names
    match exactly, else case-insensitively; unknown names map to 0 (background).
    """
    lower = {n.lower(): v for n, v in label_names.items()}
    mapping = {}
    for position, entry in enumerate(label_info, start=1):
        name = str(entry.get("name", "")) if isinstance(entry, dict) else str(entry)
        idx = entry.get("idx") if isinstance(entry, dict) else None
        if idx is not None and idx != position:
            logger.info(f"label_info entry {name!r} has idx {idx} but is exported as value {position}")
        mapping[position] = int(label_names.get(name, lower.get(name.lower(), 0)))
    return mapping


def remap_label_file(
    path: str | os.PathLike, mapping: dict[int, int], tmp_dir: str | os.PathLike | None = None
) -> dict[int, int] | None:
    """Rewrite the label file so value ``k`` becomes ``mapping[k]`` (values not in ``mapping`` -> 0).

    Keeps the header (geometry, pixel type); replaces the file atomically through a temporary file in
    ``tmp_dir`` (same file system as ``path``; default: the parent of the file's folder, outside the
    ``labels/<tag>/`` folder the datastore watches). Returns the changes ``{old: new}`` applied, or None
    when the file already agrees.
    """
    import SimpleITK as sitk

    path = Path(path)
    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() != 1:
        logger.info(f"{path.name}: multi-component label (e.g. .seg.nrrd with overlaps); left as is")
        return None
    arr = sitk.GetArrayViewFromImage(img)
    present = [int(v) for v in np.unique(arr) if v != 0]
    changes = {v: int(mapping.get(v, 0)) for v in present if int(mapping.get(v, 0)) != v}
    if not changes:
        return None
    out = np.zeros_like(arr)
    for v in present:
        target = int(mapping.get(v, 0))
        if target:
            out[arr == v] = target
    new = sitk.GetImageFromArray(out)
    new.CopyInformation(img)
    # temp file outside labels/<tag>/ (the datastore watches those), same file system: atomic replace
    suffix = "".join(path.suffixes) or ".nii.gz"
    tmp = Path(tmp_dir or path.parent.parent) / f".segdiff-remap-{uuid.uuid4().hex}{suffix}"
    try:
        sitk.WriteImage(new, str(tmp), True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return changes


def present_values(path: str | os.PathLike) -> list[int]:
    """The non-zero values of a label file, ascending."""
    import SimpleITK as sitk

    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))) if v != 0]


def seg_label_info(
    values: list[int], label_names: dict[str, int], given: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``label_info`` for MONAI Label's DICOM SEG writer, one entry per value in ``values``.

    MONAI Label names the i-th non-zero value present in a label file after the i-th ``label_info``
    entry, whatever the entries' ``idx``; so the list must follow the values actually present. Names
    come from ``label_names``; other fields (color, description) from the ``given`` entry of that name.
    """
    names = {v: n for n, v in label_names.items()}
    by_name = {str(e.get("name", "")).lower(): e for e in given or [] if isinstance(e, dict)}
    out = []
    for value in values:
        name = names.get(value, f"label {value}")
        out.append({**by_name.get(name.lower(), {}), "name": name, "idx": value})
    return out
