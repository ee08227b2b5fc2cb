"""The ``label_info`` MONAI Label's DICOM SEG writer needs: one entry per label value present in the
file, named from a ``{name: value}`` mapping (the label set's or the model's)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import SimpleITK as sitk


def present_values(path: str | os.PathLike) -> list[int]:
    """The non-zero values of a label file, ascending."""
    image = sitk.ReadImage(str(path))  # kept alive while its array view is read (a view of a temporary
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(image)) if v != 0]  # reads freed memory)


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
