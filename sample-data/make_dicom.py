#!/usr/bin/env python
"""Write the sample chest CT (``chest-ct/chest_ct.nii.gz``) as a DICOM CT series, one file per slice.

For trying the MONAI Label app against a PACS (e.g. Orthanc with its DICOMweb plugin): upload the files
(``curl -X POST http://127.0.0.1:8042/instances --data-binary @FILE`` for each, or Orthanc's
"Upload" page) and start the server with ``--studies http://127.0.0.1:8042/dicom-web``.

The output is deterministic: UIDs are derived from the series name (``--name``), dates are fixed, so
repeated runs write identical files and the same SeriesInstanceUID (the MONAI Label image id). The
geometry (LPS origin, direction, spacing) is SimpleITK's reading of the NIfTI, so reading the series
back with SimpleITK gives the same voxels on the same grid.

Usage::

    python sample-data/make_dicom.py --output DIR [--image NIFTI] [--name NAME]
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE / "chest-ct" / "chest_ct.nii.gz"
DEFAULT_NAME = "chest_ct"
DATE, TIME = "20240101", "120000"


def uid(name: str, *parts: object) -> str:
    """A deterministic UID for ``name`` and ``parts``: ``2.25.`` + a name-based (version 5) UUID."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(["monai-segdiff", name, *map(str, parts)])).int)


def series_uid(name: str = DEFAULT_NAME) -> str:
    """The SeriesInstanceUID :func:`make` writes for ``name`` (the MONAI Label image id)."""
    return uid(name, "series")


def _ds(values: list[float]) -> list[str]:
    """Decimal strings (VR DS): as many significant digits as fit in 16 characters."""
    return [next(t for p in range(15, 0, -1) if len(t := f"{float(v):.{p}g}") <= 16) for v in values]


def common(name: str, image: sitk.Image) -> Dataset:
    """Patient, study, series, equipment, frame of reference and image pixel attributes of every slice."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SegDiff^ChestCT", name, "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = uid(name, "study"), "1", ""
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = DATE, TIME, ""
    ds.StudyDescription = "monai-segdiff sample chest CT"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid(name), 1, "CT"
    ds.SeriesDate, ds.SeriesTime, ds.SeriesDescription = DATE, TIME, "chest CT (3D Slicer sample data)"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = DATE, TIME, 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uid(name, "frame"), ""
    ds.Manufacturer, ds.BodyPartExamined = "monai-segdiff", "CHEST"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.KVP = ""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    ds.ImageOrientationPatient = _ds([*direction[:, 0], *direction[:, 1]])
    sx, sy, sz = image.GetSpacing()
    ds.PixelSpacing = _ds([sy, sx])  # row spacing (between rows), column spacing
    ds.SliceThickness = _ds([sz])[0]
    ds.Rows, ds.Columns = image.GetSize()[1], image.GetSize()[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return ds


def make(output: Path, image: Path = DEFAULT_IMAGE, name: str = DEFAULT_NAME) -> list[Path]:
    """Write ``image`` (int16 CT) as ``output/CT_<slice>.dcm``; returns the files in slice order."""
    img = sitk.ReadImage(str(image))
    values = sitk.GetArrayFromImage(img)  # [z, y, x]
    if values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max:
        raise ValueError(f"{image}: values do not fit int16")
    values = values.astype(np.int16)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    origin, step = np.asarray(img.GetOrigin()), img.GetSpacing()[2] * direction[:, 2]
    normal = np.cross(direction[:, 0], direction[:, 1])
    base = common(name, img)
    output.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(values.shape[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = uid(name, "instance", k)
        ds.InstanceNumber = k + 1
        position = origin + k * step
        ds.ImagePositionPatient = _ds(list(position))
        ds.SliceLocation = _ds([float(position @ normal)])[0]
        ds.PixelData = np.ascontiguousarray(values[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = output / f"CT_{k + 1:03d}.dcm"
        pydicom.dcmwrite(str(path), ds, write_like_original=False)
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="int16 CT volume (NIfTI, NRRD, ...)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the DICOM files")
    parser.add_argument("--name", default=DEFAULT_NAME, help="PatientID; seeds the UIDs")
    args = parser.parse_args(argv)
    files = make(args.output, args.image, args.name)
    print(f"{len(files)} slices -> {args.output}  SeriesInstanceUID {series_uid(args.name)}")


if __name__ == "__main__":
    main()
