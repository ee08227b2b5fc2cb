"""3D Slicer segmentation files (``.seg.nrrd``) through ``slicerio``.

Reading gives a label map in MONAI's convention (``[X, Y, Z]`` voxels, RAS affine) with segments matched
to the model's labels **by name** (Slicer keeps its own label values and may store overlapping segments
in several layers); writing stores a prediction as one named segment per label, with the label value of
the model, so Slicer shows the segment names and ``read_seg_nrrd`` gives back the same label map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicerio
import torch
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from .atomic import atomic_write
from .values import affine_4x4

logger = logging.getLogger(__name__)

SEG_NRRD = ".seg.nrrd"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: RAS <-> LPS


def is_seg_nrrd(path: str | Path) -> bool:
    """A Slicer segmentation file name."""
    return str(path).lower().endswith(SEG_NRRD)


def _segment_values(segmentation: dict, label_names: Mapping[str, int] | None) -> list[tuple[str, int]]:
    """``(segment name, output label value)`` pairs: by name when ``label_names`` knows any of the
    names, else the file's own label values (segment order for overlapping layers)."""
    segments = [s for s in segmentation.get("segments", []) if s.get("name")]
    names = list(dict.fromkeys(s["name"] for s in segments))
    if label_names:
        known = [(n, int(label_names[n])) for n in names if n in label_names and int(label_names[n]) > 0]
        if known:
            dropped = [n for n in names if n not in label_names]
            if dropped:
                logger.warning(f"segments {dropped} are not labels of the model {sorted(label_names)}: dropped")
            return known
        logger.warning(f"no segment name {names} is a label name {sorted(label_names)}: keeping the file's values")
    voxels = segmentation["voxels"]
    values = [int(s.get("labelValue", 1)) for s in segments]
    if voxels.ndim == 3 and len(set(values)) == len(values):
        return [(s["name"], v) for s, v in zip(segments, values)]
    return [(n, i + 1) for i, n in enumerate(names)]


def segment_names(path: str | Path) -> list[str]:
    """The segment names of a ``.seg.nrrd`` file, in the file's order (header only, no voxels)."""
    try:
        segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as e:  # pynrrd raises several types for a broken file
        raise ValueError(f"cannot read Slicer segmentation {path}: {str(e).splitlines()[0][:200]}") from e
    return list(dict.fromkeys(s["name"] for s in segmentation.get("segments", []) if s.get("name")))


def read_seg_nrrd(path: str | Path, label_names: Mapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(label map [X, Y, Z] uint8/uint16, RAS affine 4x4)`` of a ``.seg.nrrd`` file.

    Args:
        path: the segmentation file.
        label_names: ``{name: value}`` (e.g. ``SegDiffConfig.label_names``); segments are given these
            values by name and segments of other names are dropped. Without it, or when no name
            matches, the file's own label values are kept.
    """
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as e:  # pynrrd raises several types for a broken file
        raise ValueError(f"cannot read Slicer segmentation {path}: {str(e).splitlines()[0][:200]}") from e
    pairs = _segment_values(segmentation, label_names)
    voxels = segmentation["voxels"]
    if pairs:
        voxels = slicerio.extract_segments(segmentation, pairs)["voxels"]
    else:  # no segment at all: an empty label map on the file's grid
        voxels = np.zeros(voxels.shape[-3:], dtype=voxels.dtype)
    dtype = np.uint8 if max((v for _, v in pairs), default=0) <= 255 else np.uint16
    affine = LPS_FROM_RAS @ np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    return voxels.astype(dtype), affine


def write_seg_nrrd(
    label: torch.Tensor | np.ndarray,
    affine: torch.Tensor | np.ndarray,
    path: str | Path,
    label_names: Mapping[str, int],
    colors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Write a label map ``[1, *spatial]`` / ``[*spatial]`` (2D or 3D, RAS ``affine``) as a Slicer
    segmentation: one segment per foreground entry of ``label_names`` (``{name: value}``), stored with
    that value, named and coloured. Atomic (temp file + rename)."""
    arr = np.asarray(torch.as_tensor(label).detach().cpu())
    two_d = tuple(torch.as_tensor(affine).shape) == (3, 3)
    if arr.ndim == (3 if two_d else 4):  # drop the channel axis
        arr = arr[0]
    if two_d and arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2D or 3D label map matching its affine, got shape {arr.shape}")
    fg = sorted(((n, int(v)) for n, v in label_names.items() if int(v) > 0), key=lambda nv: nv[1])
    top = max([v for _, v in fg] + [int(arr.max()) if arr.size else 0])
    segments = [
        {"id": name, "name": name, "labelValue": value, "layer": 0,
         "color": list(colors[name]) if colors and name in colors else _color(value)}
        for name, value in fg
    ]
    segmentation: dict[str, Any] = {
        "voxels": arr.astype(np.uint8 if top <= 255 else np.uint16),
        "ijkToLPS": LPS_FROM_RAS @ affine_4x4(affine),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    return atomic_write(Path(path), lambda tmp: slicerio.write_segmentation(tmp, segmentation))


def _color(value: int) -> list[float]:
    """A distinct colour per label value (matplotlib's ``tab10``)."""
    from matplotlib import colormaps  # lazy: matplotlib (~0.3 s) only when a file is written

    return [round(float(c), 4) for c in colormaps["tab10"]((value - 1) % 10)[:3]]


class SegNrrdReader(ImageReader):
    """MONAI image reader for ``.seg.nrrd`` files (``LoadImage(reader=SegNrrdReader(...))``): the label
    map of :func:`read_seg_nrrd`, RAS affine, no channel axis. Other files are refused (``read``
    raises), so MONAI's loader falls through to its other readers.

    Args:
        label_names: ``{name: value}`` the segments are mapped to by name (see :func:`read_seg_nrrd`).
    """

    def __init__(self, label_names: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.label_names = dict(label_names) if label_names else None

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return all(is_seg_nrrd(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> Any:
        files = ensure_tuple(data)
        if len(files) != 1 or not self.verify_suffix(files):
            raise ValueError(f"not a single {SEG_NRRD} file: {data}")
        return read_seg_nrrd(files[0], self.label_names)

    def get_data(self, img: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, dict]:
        voxels, affine = img
        meta = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(voxels.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        return voxels, meta
