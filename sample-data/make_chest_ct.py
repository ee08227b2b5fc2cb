#!/usr/bin/env python
"""Build the ``sample-data/chest-ct`` studies folder from the 3D Slicer sample data shipped in slicerio.

The PyPI package ``slicerio`` (MIT licence) ships ``data/CTChest4.nrrd`` (a low-resolution chest CT,
128x128x34, 3.05x3.05x10 mm) and ``data/Segmentation.seg.nrrd`` (a 3D Slicer segmentation on the same
grid). This script reads both, merges the segments into a small label set (see ``LABEL_SET``) and writes
a MONAI Label studies folder::

    chest-ct/chest_ct.nii.gz                 int16 Hounsfield units
    chest-ct/labels/final/chest_ct.nii.gz    uint8 labels on the image's grid and affine
    chest-ct/labels.json                     {"background": 0, "lung": 1, ...}

SimpleITK converts the NRRD's LPS geometry to the NIfTI RAS affine when writing.

Usage::

    python sample-data/make_chest_ct.py [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "chest-ct"
NAME = "chest_ct"

# output label -> (value, Slicer segment names merged into it). "tissue" (the whole body's soft tissue,
# a catch-all region) is left out as background.
LABEL_SET: dict[str, tuple[int, tuple[str, ...]]] = {
    "lung": (1, ("right lung", "left lung")),
    "spine": (2, ("cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column")),
    "ribs": (3, ("ribs",)),
}


def slicerio_data(filename: str) -> Path:
    """Path of a sample file shipped inside the installed slicerio package."""
    path = Path(os.path.dirname(slicerio.__file__)) / "data" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in the installed slicerio package ({path.parent})")
    return path


def read_labels(segmentation_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Merged label array (i, j, k order) and its IJK->LPS matrix."""
    segmentation = slicerio.read_segmentation(str(segmentation_file))
    names = slicerio.segment_names(segmentation)
    print("segments in", segmentation_file.name + ":", ", ".join(names))
    pairs = [(segment, value) for value, segments in LABEL_SET.values() for segment in segments]
    missing = [segment for segment, _ in pairs if segment not in names]
    if missing:
        raise ValueError(f"segments not found: {missing}")
    extracted = slicerio.extract_segments(segmentation, pairs)
    return np.asarray(extracted["voxels"], dtype=np.uint8), np.asarray(extracted["ijkToLPS"])


def label_image(labels_ijk: np.ndarray, ijk_to_lps: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK label image on ``reference``'s grid (resampled by nearest neighbour if needed)."""
    label = sitk.GetImageFromArray(np.ascontiguousarray(labels_ijk.transpose(2, 1, 0)))
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    label.SetSpacing(tuple(float(s) for s in spacing))
    label.SetOrigin(tuple(float(o) for o in ijk_to_lps[:3, 3]))
    label.SetDirection(tuple(float(d) for d in (ijk_to_lps[:3, :3] / spacing).ravel()))
    same_grid = (
        label.GetSize() == reference.GetSize()
        and np.allclose(label.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        and np.allclose(label.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        and np.allclose(label.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if same_grid:
        label.CopyInformation(reference)
        return label
    print("segmentation grid differs from the image: resampling labels (nearest neighbour)")
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def make(output: Path) -> None:
    """Write the chest CT studies folder to ``output``."""
    ct = sitk.ReadImage(str(slicerio_data("CTChest4.nrrd")))
    values = sitk.GetArrayViewFromImage(ct)
    if values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max:
        raise ValueError("CT values do not fit int16")
    ct = sitk.Cast(ct, sitk.sitkInt16)
    labels_ijk, ijk_to_lps = read_labels(slicerio_data("Segmentation.seg.nrrd"))
    label = sitk.Cast(label_image(labels_ijk, ijk_to_lps, ct), sitk.sitkUInt8)

    (output / "labels" / "final").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct, str(output / f"{NAME}.nii.gz"), useCompression=True)
    sitk.WriteImage(label, str(output / "labels" / "final" / f"{NAME}.nii.gz"), useCompression=True)
    names = {"background": 0, **{name: value for name, (value, _) in LABEL_SET.items()}}
    (output / "labels.json").write_text(json.dumps(names, indent=2) + "\n")

    counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=len(names))
    print(f"image {ct.GetSize()} spacing {tuple(round(s, 3) for s in ct.GetSpacing())}")
    for name, value in names.items():
        print(f"  {value} {name}: {counts[value]} voxels")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="studies folder to write")
    make(parser.parse_args(argv).output)


if __name__ == "__main__":
    main()
