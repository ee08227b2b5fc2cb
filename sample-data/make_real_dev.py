#!/usr/bin/env python
"""Build a small *real* development set (scans + masks) from data shipped inside public PyPI packages.

Three packages ship real scans with masks in their source or wheel archives:

* ``totalsegmentator`` 2.18.0 (sdist): example CT and MR scans under ``tests/reference_files/`` with the
  reference segmentations of TotalSegmentator's own test suite (outputs of its openly licensed ``total``
  and ``total_mr`` models, i.e. machine labels, not manual ones);
* ``pyradiomics`` 3.0.1 (sdist): the ``data/`` test cases (brain MR and lung CT with a tumour mask);
* ``slicerio`` 1.4.0 (wheel): the 3D Slicer sample chest CT with its segmentation.

They are fetched once into a cache (``pip download --no-deps``; sdists with ``--no-binary :all:
--no-build-isolation``; if pip fails, the file is fetched from PyPI's file host by its simple-API URL),
checked against pinned SHA-256 digests, and only the needed members are unpacked. Each task becomes a
studies folder in MONAI Label's local datastore layout::

    OUT/<task>/<case>.nii.gz               image as stored by the source (orientation kept, no resampling)
    OUT/<task>/labels/final/<case>.nii.gz  uint8 label map on exactly the image's grid and affine
    OUT/<task>/labels.json                 {"background": 0, "<structure>": 1, ...}
    OUT/<task>/cases.json                  per case: modality, package, source files, notes
    OUT/<task>/SOURCE.md                   provenance and licences of the task's files

Tasks (see ``TASKS``): ``abdomen`` (liver/spleen/stomach; 2 CT + 1 MR), ``spine`` (vertebrae; 3 CT),
``lung-tumour`` (2 CT) and ``brain-tumour`` (2 MR). Images larger than ``--max-voxels`` (default 256^3)
are cropped around their labels (never resampled); with the shipped sources none is.

Usage::

    python sample-data/make_real_dev.py --output /tmp/realdev              # fetch (once), build, list
    python sample-data/make_real_dev.py --output /tmp/realdev --list       # describe a built set
    python sample-data/make_real_dev.py --output /tmp/realdev --offline --task spine
    python sample-data/make_real_dev.py --output DIR --cache CACHE   # default ~/.cache/monai-segdiff/real

Needs numpy, SimpleITK, nibabel and slicerio (for the Slicer segmentation); pip for the first download.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import SimpleITK as sitk

DEFAULT_CACHE = Path(os.environ.get("MONAI_SEGDIFF_REAL_CACHE", "~/.cache/monai-segdiff/real")).expanduser()
DEFAULT_MAX_VOXELS = 256**3
CROP_MARGIN = 16  # voxels kept around the labels' bounding box when a too large image is cropped
PYPI_SIMPLE = "https://pypi.org/simple"


# --------------------------------------------------------------------------------------------------
# Source packages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """One file of a PyPI release; member paths in specs are relative to ``prefix`` inside it."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith(".tar.gz")

    @property
    def prefix(self) -> str:
        """Top folder of an sdist (``name-version/``); wheels have none."""
        return f"{self.filename[: -len('.tar.gz')]}/" if self.is_sdist else ""

    @property
    def title(self) -> str:
        return f"{self.name} {self.version} ({'sdist' if self.is_sdist else 'wheel'} `{self.filename}`)"


PACKAGES: dict[str, Package] = {
    "totalsegmentator": Package(
        "totalsegmentator", "2.18.0", "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        "Apache-2.0 (the package's `LICENSE`; it states no separate terms for its test files). The masks are "
        "outputs of TotalSegmentator's `total` / `total_mr` models, which its README lists as openly "
        "available under Apache-2.0 (outputs of its licence-only models in the same folder are not used). "
        "The package does not say where the example scans come from (the DICOM example carries no "
        "patient name or ID).",
    ),
    "pyradiomics": Package(
        "pyradiomics", "3.0.1", "pyradiomics-3.0.1.tar.gz",
        "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        "BSD-3-Clause, Copyright 2017 Harvard Medical School (the package's `LICENSE.txt`). `data/README.md` "
        "calls the files the test cases of PyRadiomics' feature tests; their clinical origin is not stated. "
        "(3.0.1, not the newest 3.1.0: pip rejects the 3.1.0 sdist, whose metadata says version 3.0.1a1.)",
    ),
    "slicerio": Package(
        "slicerio", "1.4.0", "slicerio-1.4.0-py3-none-any.whl",
        "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
        "MIT, Copyright (c) 2021 Andras Lasso (the package's `LICENSE`); 3D Slicer sample data "
        "(https://www.slicer.org).",
    ),
}

# TotalSegmentator's class names live in this module of its sdist (read with ``ast``, never imported).
TS_CLASS_MAP = "totalsegmentator/map_to_binary.py"


# --------------------------------------------------------------------------------------------------
# Task specifications
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mask:
    """The voxels of one output structure in one label file of a package.

    ``values`` are label values in the file; or ``names`` are class names resolved through ``scheme``:
    ``"total"`` / ``"total_mr"`` (TotalSegmentator's class map) or ``"slicer"`` (segment names of a 3D
    Slicer ``.seg.nrrd``).
    """

    file: str
    values: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    scheme: str = ""

    def describe(self) -> str:
        """Where the voxels come from, e.g. ``value 1 of `data/lung1_label.nrrd```."""
        if self.values:
            what = f"value{'s' if len(self.values) > 1 else ''} {', '.join(map(str, self.values))}"
        elif self.scheme == "slicer":
            what = "segments " + ", ".join(f'"{n}"' for n in self.names)
        else:
            names = self.names if len(self.names) <= 3 else (self.names[0], "...", self.names[-1])
            plural = "es" if len(self.names) > 1 else ""
            what = f"TotalSegmentator `{self.scheme}` class{plural} {', '.join(names)}"
        return f"{what} of `{self.file}`"


@dataclass(frozen=True)
class Case:
    """One scan and the masks of the task's structures (``masks[i]`` for ``Task.structures[i]``)."""

    name: str
    package: str
    image: str  # a file, or the folder of a DICOM series, inside the package
    modality: str
    masks: tuple[Mask, ...]
    note: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    structures: tuple[str, ...]
    cases: tuple[Case, ...]

    def labels(self) -> dict[str, int]:
        return {"background": 0, **{name: i + 1 for i, name in enumerate(self.structures)}}


TS_REF = "tests/reference_files"
TS_CT = f"{TS_REF}/example_ct.nii.gz"
TS_CT_SEG = f"{TS_REF}/example_seg_fast_force_split.nii.gz"
TS_DICOM = f"{TS_REF}/example_ct_dicom"
TS_DICOM_SEG = f"{TS_REF}/example_seg_dicom.nii.gz"
TS_MR = f"{TS_REF}/example_mr_sm.nii.gz"
TS_MR_SEG = f"{TS_REF}/example_seg_mr.nii.gz"
VERTEBRAE = tuple(f"vertebrae_{region}{i}" for region, count in (("C", 7), ("T", 12), ("L", 5))
                  for i in range(1, count + 1))
TS_CT_NOTE = ("Abdomen and pelvis, 3 mm isotropic; labels from TotalSegmentator `--fast --ml -fs` on this "
              "file (`example_ct_sm.nii.gz` is its first 30 slices, so it is not used as another case).")
TS_DICOM_NOTE = ("20 axial DICOM slices (upper abdomen, T11-T12) read with SimpleITK in their native LPS "
                 "order; labels from TotalSegmentator `--fast --ml` on this series, stored y-flipped (L-A-S) "
                 "by its DICOM-to-NIfTI conversion.")
SLICER_SPINE = ("cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column")
TS_MR_NOTE = "Abdominal MR, 3 mm isotropic; labels from TotalSegmentator `-ta total_mr --ml`."


def _ts(file: str, scheme: str, *names: str) -> Mask:
    return Mask(file, names=names, scheme=scheme)


TASKS: tuple[Task, ...] = (
    Task(
        "abdomen",
        "Abdominal organs in CT (two scans) and MR (one scan): a cross-modality set; the leave-one-out fold "
        "that holds out the MR case tests CT->MR transfer. Labels are TotalSegmentator model outputs.",
        ("liver", "spleen", "stomach"),
        (
            Case("ts_example_ct", "totalsegmentator", TS_CT, "CT",
                 tuple(_ts(TS_CT_SEG, "total", s) for s in ("liver", "spleen", "stomach")), TS_CT_NOTE),
            Case("ts_example_ct_dicom", "totalsegmentator", TS_DICOM, "CT",
                 tuple(_ts(TS_DICOM_SEG, "total", s) for s in ("liver", "spleen", "stomach")), TS_DICOM_NOTE),
            Case("ts_example_mr", "totalsegmentator", TS_MR, "MR",
                 tuple(_ts(TS_MR_SEG, "total_mr", s) for s in ("liver", "spleen", "stomach")), TS_MR_NOTE),
        ),
    ),
    Task(
        "spine",
        "Vertebrae (vertebral column C1-L5, no sacrum) in three CT scans of different resolution and "
        "orientation. Two label maps are TotalSegmentator model outputs (its classes vertebrae_C1 ... "
        "vertebrae_L5 merged), one is the 3D Slicer sample segmentation (its cervical, thoracic and lumbar "
        "vertebral-column segments merged).",
        ("vertebrae",),
        (
            Case("ts_example_ct", "totalsegmentator", TS_CT, "CT", (_ts(TS_CT_SEG, "total", *VERTEBRAE),),
                 TS_CT_NOTE),
            Case("ts_example_ct_dicom", "totalsegmentator", TS_DICOM, "CT",
                 (_ts(TS_DICOM_SEG, "total", *VERTEBRAE),), TS_DICOM_NOTE),
            Case("slicer_ctchest4", "slicerio", "slicerio/data/CTChest4.nrrd", "CT",
                 (Mask("slicerio/data/Segmentation.seg.nrrd", names=SLICER_SPINE, scheme="slicer"),),
                 "Low-resolution chest CT (3.05 x 3.05 x 10 mm) from the 3D Slicer sample data; its three "
                 "vertebral-column segments merged."),
        ),
    ),
    Task(
        "lung-tumour",
        "A lung tumour in each of two chest CT scans (PyRadiomics test cases lung1, lung2; the package does "
        "not name the structure: one labelled finding per scan, a small ~1.4 ml one in lung1 and a ~48 ml "
        "mass in lung2). Thick slices (5 mm), full 512 x 512 field of view.",
        ("tumour",),
        tuple(
            Case(f"pyrad_lung{i}", "pyradiomics", f"data/lung{i}_image.nrrd", "CT",
                 (Mask(f"data/lung{i}_label.nrrd", values=(1,)),))
            for i in (1, 2)
        ),
    ),
    Task(
        "brain-tumour",
        "A brain tumour in each of two brain MR scans (PyRadiomics test cases brain1, brain2): arbitrary MR "
        "intensities, 0.78 x 0.78 mm in plane with 6.5 mm slices, stored L-A-S (y axis flipped).",
        ("tumour",),
        tuple(
            Case(f"pyrad_brain{i}", "pyradiomics", f"data/brain{i}_image.nrrd", "MR",
                 (Mask(f"data/brain{i}_label.nrrd", values=(1,)),))
            for i in (1, 2)
        ),
    ),
)


# --------------------------------------------------------------------------------------------------
# Fetching and unpacking
# --------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    """Hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_packages(cache: Path, tasks: Sequence[Task] = TASKS) -> list[str]:
    """File names of the packages ``tasks`` need that are not in ``cache``."""
    needed = sorted({PACKAGES[case.package].filename for task in tasks for case in task.cases})
    return [name for name in needed if not (cache / name).is_file()]


def pip_download(package: Package, cache: Path) -> bool:
    """``pip download`` the package's file into ``cache``; False (pip's last lines printed) on failure.

    Sdists need ``--no-build-isolation``: pip prepares their metadata, and pyradiomics' ``setup.py`` imports
    numpy, which an isolated build environment would have to build from source under ``--no-binary``.
    """
    if package.is_sdist:
        kind = ["--no-binary", ":all:", "--no-build-isolation"]
    else:
        kind = ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--dest", str(cache),
               f"{package.name}=={package.version}"]
    print("  $", " ".join(command[2:]))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and (cache / package.filename).is_file():
        return True
    tail = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()][-3:]
    print("  pip download failed:", *tail, sep="\n    ")
    return False


def pypi_download(package: Package, target: Path) -> None:
    """Fetch the file from PyPI's file host, by the URL that PyPI's simple API (JSON) gives for it."""
    request = urllib.request.Request(f"{PYPI_SIMPLE}/{package.name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    url = next((f["url"] for f in files if f["filename"] == package.filename), None)
    if url is None:
        raise FileNotFoundError(f"{package.filename} is not listed on PyPI")
    print("  fetching", url)
    partial = target.with_suffix(target.suffix + ".part")
    with urllib.request.urlopen(url, timeout=300) as response, partial.open("wb") as out:
        shutil.copyfileobj(response, out)
    partial.rename(target)


def fetch(package: Package, cache: Path, download: bool = True) -> Path:
    """The package file in ``cache`` (downloaded if missing and allowed), checked against its SHA-256."""
    path = cache / package.filename
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{path} not in the cache (run without --offline to download it)")
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {package.title}")
        if not pip_download(package, cache):
            pypi_download(package, path)
    if sha256(path) != package.sha256:
        raise ValueError(f"{path}: SHA-256 differs from the pinned {package.sha256}; delete it and retry")
    return path


def wanted_members(package: str, tasks: Iterable[Task]) -> set[str]:
    """Paths (relative to the package prefix) that the tasks read from ``package``."""
    wanted: set[str] = set()
    for case in (c for task in tasks for c in task.cases if c.package == package):
        wanted.add(case.image)
        for mask in case.masks:
            wanted.add(mask.file)
            if mask.scheme in ("total", "total_mr"):
                wanted.add(TS_CLASS_MAP)
    return wanted


def _is_wanted(relative: str, wanted: set[str]) -> bool:
    """``relative`` is a wanted file or lies below a wanted folder (and cannot point outside it)."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        return False
    return relative in wanted or bool({str(p) for p in path.parents} & wanted)


def unpack(package: Package, archive: Path, wanted: set[str], destination: Path) -> Path:
    """Copy the wanted members (files, or every file below a wanted folder) to ``destination``."""
    def write(relative: str, data: bytes) -> None:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    if package.is_sdist:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not (member.isfile() and member.name.startswith(package.prefix)):
                    continue
                relative = member.name.removeprefix(package.prefix)
                if _is_wanted(relative, wanted):
                    write(relative, tar.extractfile(member).read())
    else:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if not name.endswith("/") and _is_wanted(name, wanted):
                    write(name, wheel.read(name))
    absent = [w for w in wanted if not (destination / w).exists()]
    if absent:
        raise FileNotFoundError(f"not in {archive.name}: {absent}")
    return destination


# --------------------------------------------------------------------------------------------------
# Reading images and masks
# --------------------------------------------------------------------------------------------------
def read_image(path: Path) -> sitk.Image:
    """A file, or a DICOM series folder, as int16 when its values are integers that fit, else float32."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise ValueError(f"{path}: expected one DICOM series, found {len(series)}")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    values = sitk.GetArrayViewFromImage(image)
    info = np.iinfo(np.int16)
    integral = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if integral and values.min() >= info.min and values.max() <= info.max:
        return sitk.Cast(image, sitk.sitkInt16)
    return sitk.Cast(image, sitk.sitkFloat32)


@functools.lru_cache(maxsize=None)
def ts_class_ids(class_map_file: Path, scheme: str) -> dict[str, int]:
    """TotalSegmentator class name -> label value for ``scheme`` (e.g. ``total``), read from its source."""
    tree = ast.parse(class_map_file.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "class_map" for t in node.targets):
            return {name: value for value, name in ast.literal_eval(node.value)[scheme].items()}
    raise ValueError(f"no class_map in {class_map_file}")


def mask_values(root: Path, mask: Mask) -> tuple[int, ...]:
    """The label values of ``mask`` in its file."""
    if mask.values:
        return mask.values
    ids = ts_class_ids(root / TS_CLASS_MAP, mask.scheme)
    unknown = [name for name in mask.names if name not in ids]
    if unknown:
        raise KeyError(f"{mask.scheme}: unknown classes {unknown}")
    return tuple(ids[name] for name in mask.names)


def slicer_mask(path: Path, segment_names: Sequence[str]) -> sitk.Image:
    """The union of named segments of a 3D Slicer ``.seg.nrrd`` as a binary image on its own grid."""
    import slicerio  # the project's dependency; needed only for Slicer segmentations

    segmentation = slicerio.read_segmentation(str(path))
    missing = sorted(set(segment_names) - set(slicerio.segment_names(segmentation)))
    if missing:
        raise KeyError(f"{path.name}: segments not found: {missing}")
    extracted = slicerio.extract_segments(segmentation, [(name, 1) for name in segment_names])
    ijk_to_lps = np.asarray(extracted["ijkToLPS"], dtype=float)
    voxels_ijk = np.asarray(extracted["voxels"], np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels_ijk.transpose(2, 1, 0)))
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    image.SetDirection([float(d) for d in (ijk_to_lps[:3, :3] / spacing).ravel()])
    return image


def read_mask(root: Path, mask: Mask) -> sitk.Image:
    """``mask`` as a binary uint8 image on the grid of its file."""
    if mask.scheme == "slicer":
        return slicer_mask(root / mask.file, mask.names)
    labels = sitk.ReadImage(str(root / mask.file))
    selected = np.isin(sitk.GetArrayViewFromImage(labels), mask_values(root, mask))
    binary = sitk.GetImageFromArray(selected.astype(np.uint8))
    binary.CopyInformation(labels)
    return binary


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, spacing, origin and direction (to rounding)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5)
    )


def on_grid(mask: sitk.Image, reference: sitk.Image) -> tuple[np.ndarray, str]:
    """``mask`` as a boolean array on ``reference``'s grid (z, y, x), and a note if it had to be resampled."""
    if same_grid(mask, reference):
        return sitk.GetArrayFromImage(mask).astype(bool), ""
    def nearest(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
        return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    resampled = nearest(mask, reference)
    if np.array_equal(sitk.GetArrayViewFromImage(nearest(resampled, mask)), sitk.GetArrayViewFromImage(mask)):
        note = ("mask put on the image grid by nearest-neighbour resampling, lossless (resampling back gives "
                "it exactly)")
    else:
        note = "mask resampled to the image grid by nearest neighbour (not lossless)"
    return sitk.GetArrayFromImage(resampled).astype(bool), note


def label_map(root: Path, case: Case, image: sitk.Image) -> tuple[sitk.Image, list[str]]:
    """The case's uint8 label map on ``image``'s grid (structure i -> value i + 1) and notes."""
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    notes: list[str] = []
    for value, mask in enumerate(case.masks, start=1):
        array, note = on_grid(read_mask(root, mask), image)
        overlap = int(np.count_nonzero(array & (labels > 0)))
        if overlap:
            notes.append(f"{overlap} voxels of label {value} overlap an earlier label and take value {value}")
        if note and note not in notes:
            notes.append(note)
        labels[array] = value
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result, notes


def crop_to_limit(
    image: sitk.Image, labels: sitk.Image, max_voxels: int
) -> tuple[sitk.Image, sitk.Image, str]:
    """If ``image`` has more than ``max_voxels`` voxels, crop both to the largest in-plane window (all
    slices kept) centred on the labels that fits the budget and holds the labels plus ``CROP_MARGIN``:
    as much field of view as possible, since a model trained on whole cross-sections fails on a scan
    cropped tightly around its target (seen on this very case: Dice 0.67 at a 250 mm window, 0.005
    at 160 mm)."""
    size = np.array(image.GetSize())
    if size.prod() <= max_voxels:
        return image, labels, ""
    index = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0)[:, ::-1]  # (x, y, z)
    needed = index.max(axis=0) + 1 - index.min(axis=0) + 2 * CROP_MARGIN
    side = int(np.sqrt(max_voxels / size[2]))
    extent = np.array([min(size[0], max(side, needed[0])), min(size[1], max(side, needed[1])), size[2]])
    if extent.prod() > max_voxels:
        raise ValueError(f"labels need {tuple(int(e) for e in extent)} voxels, more than --max-voxels {max_voxels}")
    centre = (index.min(axis=0) + index.max(axis=0)) // 2
    lower = np.clip(centre - extent // 2, 0, size - extent)
    lower[2] = 0
    extent_list, lower_list = [int(e) for e in extent], [int(lo) for lo in lower]
    note = (f"cropped from {tuple(int(s) for s in size)} to {tuple(extent_list)} voxels, the largest in-plane "
            f"window centred on the labels within --max-voxels (no resampling)")
    return (sitk.RegionOfInterest(image, extent_list, lower_list),
            sitk.RegionOfInterest(labels, extent_list, lower_list), note)


# --------------------------------------------------------------------------------------------------
# Writing a task
# --------------------------------------------------------------------------------------------------
def write_case(case: Case, root: Path, folder: Path, max_voxels: int) -> list[str]:
    """Write one case's image and label; returns notes for SOURCE.md / cases.json."""
    image = read_image(root / case.image)
    labels, notes = label_map(root, case, image)
    image, labels, crop_note = crop_to_limit(image, labels, max_voxels)
    notes += [crop_note] if crop_note else []
    image_path = folder / f"{case.name}.nii.gz"
    label_path = folder / "labels" / "final" / f"{case.name}.nii.gz"
    sitk.WriteImage(image, str(image_path), useCompression=True)
    sitk.WriteImage(labels, str(label_path), useCompression=True)
    check_written(image_path, label_path, len(case.masks))
    return notes


def check_written(image_path: Path, label_path: Path, count: int) -> None:
    """The written label is on the image's grid and holds every value 1..count."""
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    if not same_grid(image, labels):
        raise AssertionError(f"{label_path}: grid differs from {image_path}")
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    absent = sorted(set(range(1, count + 1)) - present)
    if absent:
        raise AssertionError(f"{label_path}: label values {absent} have no voxels")


def case_notes(case: Case, build_notes: list[str]) -> list[str]:
    """The case's fixed note followed by what the build did to it (sentences)."""
    return [case.note] * bool(case.note) + [n[0].upper() + n[1:] + "." for n in build_notes]


def source_markdown(task: Task, notes: dict[str, list[str]]) -> str:
    """SOURCE.md: provenance of every case, its label mapping, and the licences of the packages used."""
    labels = ", ".join(f"{value} {name}" for name, value in task.labels().items())
    lines = [f"# `{task.name}` -- real development data", "", task.description, "",
             f"Labels (`labels.json`): {labels}.", "",
             "| case | modality | package | image (path in the package) |", "| --- | --- | --- | --- |"]
    for case in task.cases:
        package = PACKAGES[case.package]
        row = [f"`{case.name}`", case.modality, f"{package.name} {package.version}", f"`{case.image}`"]
        lines.append(f"| {' | '.join(row)} |")
    lines += ["", "Label maps (output value <- voxels of the source file) and notes:", ""]
    for case in task.cases:
        mapping = "; ".join(f"{value} `{name}` <- {mask.describe()}"
                            for value, (name, mask) in enumerate(zip(task.structures, case.masks), start=1))
        lines.append(f"- `{case.name}`: {mapping}. {' '.join(notes[case.name])}".rstrip())
    lines += ["", "Images are written as stored by the source (orientation and spacing kept; CT in HU, MR in "
              "the scanner's arbitrary units), as int16 when the values fit; labels as uint8 on the image's "
              "grid. Written by `sample-data/make_real_dev.py`.", "", "## Packages and licences", ""]
    for name in sorted({case.package for case in task.cases}):
        package = PACKAGES[name]
        lines.append(f"- **{package.title}** from PyPI, SHA-256 `{package.sha256}`. "
                     f"Licence: {package.licence}")
    return "\n".join(lines) + "\n"


def write_task(task: Task, roots: dict[str, Path], folder: Path, max_voxels: int) -> None:
    """Write one task's studies folder (replacing an earlier build of it)."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "labels" / "final").mkdir(parents=True)
    notes = {case.name: case_notes(case, write_case(case, roots[case.package], folder, max_voxels))
             for case in task.cases}
    (folder / "labels.json").write_text(json.dumps(task.labels(), indent=2) + "\n")
    cases = {
        case.name: {
            "modality": case.modality,
            "package": f"{case.package}=={PACKAGES[case.package].version}",
            "image": case.image,
            "labels": {name: mask.describe() for name, mask in zip(task.structures, case.masks)},
            "notes": notes[case.name],
        }
        for case in task.cases
    }
    (folder / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    (folder / "SOURCE.md").write_text(source_markdown(task, notes))
    print(f"wrote {folder} ({len(task.cases)} cases)")


def build(output: Path, cache: Path = DEFAULT_CACHE, tasks: Sequence[Task] = TASKS, download: bool = True,
          max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Fetch the packages ``tasks`` need and write one studies folder per task under ``output``."""
    names = sorted({case.package for task in tasks for case in task.cases})
    archives = {name: fetch(PACKAGES[name], cache, download) for name in names}
    with tempfile.TemporaryDirectory(prefix="real-dev-") as tmp:
        roots = {name: unpack(PACKAGES[name], archives[name], wanted_members(name, tasks), Path(tmp) / name)
                 for name in names}
        for task in tasks:
            write_task(task, roots, output / task.name, max_voxels)


# --------------------------------------------------------------------------------------------------
# Listing a built set
# --------------------------------------------------------------------------------------------------
def describe_case(image_path: Path, label_path: Path, labels: dict[str, int]) -> str:
    """One line: size, spacing, orientation, dtype, intensity range, foreground voxels per label."""
    image = nib.load(str(image_path))
    values = np.asanyarray(image.dataobj)
    size = "x".join(str(s) for s in image.shape)
    spacing = "x".join(f"{z:.2f}" for z in image.header.get_zooms()[:3])
    axes = "".join(nib.aff2axcodes(image.affine))
    counts = np.bincount(np.asanyarray(nib.load(str(label_path)).dataobj).astype(np.int64).ravel(),
                         minlength=max(labels.values()) + 1)
    foreground = " ".join(f"{name}={counts[value]}" for name, value in labels.items() if value)
    intensity = f"{values.min():>6.0f}..{values.max():<6.0f}"
    return f"{size:>12}  {spacing:>16} mm  {axes}  {values.dtype}  {intensity}  {foreground}"


def list_set(output: Path) -> None:
    """Print every task folder under ``output`` with its cases."""
    folders = sorted(p.parent for p in output.glob("*/labels.json"))
    if not folders:
        raise SystemExit(f"no task folders (*/labels.json) under {output}; build them first")
    for folder in folders:
        labels = json.loads((folder / "labels.json").read_text())
        cases_file = folder / "cases.json"
        cases = json.loads(cases_file.read_text()) if cases_file.is_file() else {}
        images = sorted(folder.glob("*.nii.gz"))
        names = ", ".join(f"{v} {n}" for n, v in labels.items() if v)
        print(f"{folder.name}: {len(images)} cases; labels {names}")
        for image_path in images:
            name = image_path.name[: -len(".nii.gz")]
            modality = cases.get(name, {}).get("modality", "?")
            line = describe_case(image_path, folder / "labels" / "final" / image_path.name, labels)
            print(f"  {name:<20} {modality:<3} {line}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the task folders")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="package cache (%(default)s)")
    parser.add_argument("--task", action="append", choices=[t.name for t in TASKS],
                        help="build only this task (repeatable)")
    parser.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS,
                        help="crop larger images around their labels (default 256^3)")
    parser.add_argument("--offline", action="store_true", help="use the cache only, never download")
    parser.add_argument("--list", action="store_true", help="only describe the task folders under --output")
    args = parser.parse_args(argv)
    if not args.list:
        start = time.time()
        tasks = [t for t in TASKS if not args.task or t.name in args.task]
        build(args.output, args.cache.expanduser(), tasks, not args.offline, args.max_voxels)
        print(f"built in {time.time() - start:.1f} s\n")
    list_set(args.output)


if __name__ == "__main__":
    main()
