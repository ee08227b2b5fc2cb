"""The label set of a studies folder: which label value means which structure.

A studies folder has one label set, ``labels.json`` at its top (``{"background": 0, "name": value,
...}``, values 1..K). Every stored label map uses it. A segment an annotator submits under a new name
extends the set (next free value), so nothing submitted is ever rewritten to background; names match
case-insensitively; only the ``uncertain`` segment of the app's ``segdiff_uncertainty`` model (a view
of the ensemble's doubt, not an annotation) is dropped. The file is written atomically under a file
lock, so the server and its training / scoring subprocesses always read a whole set, and values never
change once given.

Without ``labels.json``, a folder whose labels already hold values 1..K is read as ``label1..labelK``
(:func:`label_names`); the app writes ``labels.json`` at the first submitted label.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from .atomic import atomic_write
from .errors import InputError
from .io import load_label, write_nifti
from .slicer_io import is_seg_nrrd, read_seg_nrrd

__all__ = [
    "DROPPED_NAMES",
    "LABELS_FILE",
    "LabelSet",
    "SegmentMapping",
    "extend_label_set",
    "label_names",
    "largest_label",
    "max_label",
    "remap_values",
    "write_label",
]

LABELS_FILE = "labels.json"
# Segment names that never become labels: the `segdiff_uncertainty` model's "uncertain" segment (and
# the names 3D Slicer itself leaves out of a submitted label).
DROPPED_NAMES = ("uncertain", "background", "foreground_scribbles", "background_scribbles")
_LOCK = Path(".segdiff") / "labels.lock"


@dataclass
class SegmentMapping:
    """How the values of a submitted label map become label-set values.

    Attributes:
        values: ``{value in the submitted file: label-set value}`` (0: dropped to background).
        names: ``{value in the submitted file: segment name}``.
        added: names the submission added to the label set (with their new values).
        dropped: segment names dropped (``DROPPED_NAMES``), with the file value they had.
    """

    values: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def changes(self) -> dict[int, int]:
        """The values that the mapping rewrites (``{old: new}``)."""
        return {k: v for k, v in self.values.items() if k != v}


class LabelSet:
    """``{name: value}`` of a studies folder, background 0 and foreground values 1..K.

    Args:
        names: the mapping (``background`` may be left out); values must be distinct, 1..K without
            gaps, names distinct ignoring case.
    """

    def __init__(self, names: Mapping[str, int] | None = None) -> None:
        fg = {str(k): int(v) for k, v in (names or {}).items() if int(v) != 0}
        values = sorted(fg.values())
        if values != list(range(1, len(values) + 1)):
            raise InputError(f"label values must be 1..K without gaps or repeats, got {values}")
        lowered = [n.lower() for n in fg]
        if len(set(lowered)) != len(lowered) or any(not n.strip() for n in fg):
            raise InputError(f"label names must be non-empty and distinct ignoring case, got {sorted(fg)}")
        self._fg = dict(sorted(fg.items(), key=lambda kv: kv[1]))

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, studies: str | Path) -> "LabelSet":
        """The folder's ``labels.json``; an empty set if there is none."""
        path = Path(studies) / LABELS_FILE
        if not path.is_file():
            return cls()
        try:
            mapping = json.loads(path.read_text())
            return cls({str(k): int(v) for k, v in mapping.items()})
        except (ValueError, AttributeError, TypeError) as e:
            raise InputError(f"{path} must map label names to integer values 1..K: {e}") from e

    @property
    def foreground(self) -> list[str]:
        """Foreground names ordered by value (value = position + 1)."""
        return list(self._fg)

    def to_dict(self) -> dict[str, int]:
        """``{"background": 0, name: value, ...}`` (the ``labels.json`` and MONAI Label form)."""
        return {"background": 0, **self._fg}

    def value(self, name: str) -> int | None:
        """The value of ``name`` (exact, else ignoring case); None if the set does not have it."""
        if name in self._fg:
            return self._fg[name]
        lower = {n.lower(): v for n, v in self._fg.items()}
        return lower.get(name.lower())

    def __len__(self) -> int:
        return len(self._fg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self._fg == other._fg

    def __repr__(self) -> str:
        return f"LabelSet({self._fg})"

    # -- extending ------------------------------------------------------------------------------
    def add(self, name: str) -> int:
        """The value of ``name``, adding it with the next free value if the set does not have it."""
        found = self.value(name)
        if found is not None:
            return found
        if not name.strip():
            raise InputError("a label name cannot be empty")
        self._fg[name] = len(self._fg) + 1
        return self._fg[name]

    def map_segments(self, segment_names: Sequence[str], drop: Sequence[str] = DROPPED_NAMES) -> SegmentMapping:
        """Map the segments of a submitted label (value i + 1 = ``segment_names[i]``, 3D Slicer's export
        order) to this set's values, adding new names; names in ``drop`` map to 0."""
        out = SegmentMapping()
        dropped = {d.lower() for d in drop}
        for position, name in enumerate(segment_names, start=1):
            name = str(name).strip()
            out.names[position] = name
            if name.lower() in dropped:
                out.values[position] = 0
                out.dropped[name] = position
                continue
            known = self.value(name) is not None
            out.values[position] = self.add(name)
            if not known:
                out.added[name] = out.values[position]
        return out

    def save(self, studies: str | Path) -> Path:
        """Write ``labels.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write(Path(studies) / LABELS_FILE, lambda tmp: Path(tmp).write_text(text), keep_suffix=False)


def extend_label_set(studies: str | Path, segment_names: Sequence[str] | None,
                     bootstrap: Sequence[str] = ()) -> tuple[LabelSet, SegmentMapping | None]:
    """Read, extend and save the folder's label set under its file lock; ``(set, mapping)``.

    Args:
        studies: the studies folder.
        segment_names: names of a submitted label's values 1..n (None: no names; nothing is added).
        bootstrap: the names of values 1..K to start from when the folder has no ``labels.json`` yet
            (e.g. ``label1..labelK`` for labels stored before the set existed).
    """
    lock = Path(studies) / _LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        exists = (Path(studies) / LABELS_FILE).is_file()
        labels = LabelSet.load(studies) if exists else LabelSet({n: i + 1 for i, n in enumerate(bootstrap)})
        mapping = labels.map_segments(segment_names) if segment_names is not None else None
        if not exists or (mapping is not None and mapping.added):
            labels.save(studies)
    return labels, mapping


def remap_values(array: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """``array`` (whole non-negative values) with each value ``k`` replaced by ``mapping[k]`` (values
    not in ``mapping`` kept), as uint8 (uint16 above 255), in one table look-up."""
    top = int(max([int(np.max(array, initial=0)), *mapping.keys(), *mapping.values()]))
    table = np.arange(top + 1, dtype=np.int64)
    for old, new in mapping.items():
        table[int(old)] = int(new)
    return table[np.asarray(array).astype(np.int64)].astype(np.uint8 if top <= 255 else np.uint16)


def write_label(src: str | Path, dest: str | Path, mapping: Mapping[int, int], tmp_dir: str | Path,
                label_names: Mapping[str, int] | None = None, grid: str | Path | None = None) -> None:
    """Store the label map ``src`` as ``dest`` with its values mapped (``mapping``; other values kept),
    keeping the file's header (grid, pixel type) and format; a 0/255 mask is read as 0/1. A 3D Slicer
    ``.seg.nrrd`` is read by segment name with ``label_names`` and written as a label map (``dest``
    should then end in ``.nii.gz``). With ``grid`` (an image file), the label is first resampled onto
    that image's grid (nearest neighbour, background outside). The file is written in ``tmp_dir`` (same
    file system, outside any watched folder) and renamed over ``dest``: readers see the old or the whole
    new label."""
    ext = "".join(Path(dest).suffixes) or ".nii.gz"
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".segdiff-label-", suffix=ext)
    os.close(fd)
    try:
        if is_seg_nrrd(src):
            voxels, affine = read_seg_nrrd(src, label_names)
            write_nifti(remap_values(voxels, mapping), affine, tmp)
        else:
            img = sitk.ReadImage(str(src))
            if grid is not None:
                img = sitk.Resample(img, sitk.ReadImage(str(grid)), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                    img.GetPixelID())
            arr = sitk.GetArrayFromImage(img)
            if arr.max(initial=0) == 255 and set(np.unique(arr).tolist()) <= {0, 255}:
                arr = arr // 255
            out = sitk.GetImageFromArray(remap_values(arr, mapping))
            out.CopyInformation(img)
            sitk.WriteImage(out, tmp, True)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def label_names(studies: str | Path, items: Sequence[dict] = ()) -> list[str]:
    """Foreground names ordered by value 1..K: ``labels.json``, else ``label1..labelK`` up to the
    largest value found in the items' labels."""
    if (Path(studies) / LABELS_FILE).is_file():
        names = LabelSet.load(studies).foreground
        if names:
            return names
    top = largest_label(items)
    if top < 1:
        raise InputError(f"no foreground label found under {Path(studies) / 'labels'}")
    return [f"label{i}" for i in range(1, top + 1)]


def largest_label(items: Sequence[dict]) -> int:
    """Largest label value over the items' label files (0 without any)."""
    return max((max_label(it["label"]) for it in items if it.get("label")), default=0)


def max_label(path: str | Path) -> int:
    """Largest value of a label file (a 0/255 picture mask counts as 0/1)."""
    return int(load_label(path).max())
