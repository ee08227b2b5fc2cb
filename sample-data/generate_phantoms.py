#!/usr/bin/env python
"""Generate the synthetic phantom studies folder shipped in ``sample-data/phantoms``.

Each case is a 64x64x32 (x, y, z) volume with two labelled structures:

* 1 = ``organ``: a smooth, lobulated blob (a rotated ellipsoid whose surface is deformed by
  low-frequency random waves),
* 2 = ``lesion``: a smaller blob inside or touching the organ (absent in a few cases).

Anatomy is defined in world (scanner, RAS) millimetres and sampled through each case's affine, so
cases with a flipped (LPS-like) voxel orientation still show the same kind of anatomy in world space.
Intensities follow either a CT-like profile (Hounsfield units, int16) or an MRI-like profile
(arbitrary positive values, float32 or int16 with a NIfTI ``scl_slope``). Some cases are deliberately
hard: low lesion contrast, strong noise, blur, a strong bias field, a small lesion. Beyond the shipped
set, ``--outlier-rate`` adds outliers ("corrupt": a failed acquisition, five times the noise and a heavy
blur, the structures barely visible), for active-learning pools where the most uncertain cases are not the
most useful ones.

Three simulated annotators (``labels/rater1..3``) disagree smoothly along the boundaries (each one's
surface is shifted inwards/outwards by up to about a voxel, more for low-contrast lesions); the
reference label ``labels/final`` is their voxel-wise majority vote (the median of three labels).

Every case is seeded by ``(seed, index)`` alone, so ``--count 2`` reproduces the first two shipped
cases exactly, and repeated runs give byte-identical arrays.

Usage::

    python sample-data/generate_phantoms.py                      # the shipped set (28 cases)
    python sample-data/generate_phantoms.py --output /tmp/ph --count 4
    python sample-data/generate_phantoms.py --output /tmp/hard --seed 2030 --count 300 --hard-rate 0.25
    python sample-data/generate_phantoms.py --output /tmp/pool --seed 77 --count 160 --outlier-rate 0.05
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (64, 64, 32)
DEFAULT_COUNT = 28
DEFAULT_SEED = 1234
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "phantoms"
RATERS = ("rater1", "rater2", "rater3")
LABELS = {"background": 0, "organ": 1, "lesion": 2}

# Case schedule of the shipped set (indices beyond it are drawn at random).
HARD_CASES: dict[int, tuple[str, ...]] = {
    1: ("low_contrast",),
    4: ("noise",),
    6: ("blur",),
    8: ("bias",),
    11: ("small_lesion",),
    14: ("low_contrast", "small_lesion"),
    16: ("noise", "bias"),
    19: ("low_contrast", "blur"),
    22: ("small_lesion", "noise"),
    25: ("low_contrast", "bias", "noise"),
    27: ("blur", "bias"),
}
NO_LESION = {3, 10, 17, 24}
FLIPPED_AXES: dict[int, tuple[int, ...]] = {5: (0, 1), 12: (0, 1), 21: (0, 2)}
HARD_KINDS = ("low_contrast", "noise", "blur", "bias", "small_lesion")
HARD_RATE = 0.12  # chance of each hard kind in a case beyond the schedule
OUTLIER = "corrupt"  # a failed acquisition (only with --outlier-rate, beyond the shipped schedule)


@dataclass
class CaseSpec:
    """Everything that defines one case (also written to ``cases.json``)."""

    name: str
    modality: str  # "ct" or "mri"
    storage: str  # "int16", "float32" or "int16_scaled"
    spacing: tuple[float, float, float]
    flipped_axes: tuple[int, ...]
    hard: tuple[str, ...]
    lesion: bool
    lesion_touches_boundary: bool = False
    voxels: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# small numpy helpers
# ----------------------------------------------------------------------------------------------


def world_grid(affine: np.ndarray) -> np.ndarray:
    """World coordinates (3, X, Y, Z) in mm of every voxel centre."""
    idx = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return world.reshape((3, *SHAPE))


def random_waves(
    rng: np.random.Generator, points: np.ndarray, wavelength: tuple[float, float], count: int = 8
) -> np.ndarray:
    """A smooth random field of unit standard deviation: a sum of plane waves with random directions."""
    field_ = np.zeros(points.shape[1:], dtype=np.float64)
    for _ in range(count):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2.0 * np.pi / rng.uniform(*wavelength)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field_ += np.sin(k * np.tensordot(direction, points, axes=1) + phase)
    return field_ / np.sqrt(count / 2.0)


def gaussian_blur(volume: np.ndarray, sigma_vox: tuple[float, float, float]) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (sigma in voxels; 0 skips an axis)."""
    out = volume.astype(np.float64)
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        radius = max(1, int(np.ceil(3.0 * sigma)))
        offsets = np.arange(-radius, radius + 1)
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        weights /= weights.sum()
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for w, off in zip(weights, offsets):
            acc += w * np.take(padded, np.arange(n) + off + radius, axis=axis)
        out = acc
    return out


def occupancy(sdf: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of a structure from its approximate signed distance (mm)."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def blob_sdf(
    rng: np.random.Generator,
    points: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    wobble: float,
    wavelength: tuple[float, float],
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of a rotated, surface-deformed ellipsoid."""
    angle = rng.uniform(0.0, np.pi)
    tilt = rng.uniform(-0.3, 0.3)
    c, s = np.cos(angle), np.sin(angle)
    rot_z = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    ct, st = np.cos(tilt), np.sin(tilt)
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]])
    rot = rot_z @ rot_x
    local = np.tensordot(rot.T, points - centre[:, None, None, None], axes=1)
    rho = np.sqrt(np.sum((local / radii[:, None, None, None]) ** 2, axis=0))
    deform = wobble * random_waves(rng, points, wavelength, count=6)
    return (rho - 1.0 - deform) * float(np.mean(radii))


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------


def case_spec(index: int, rng: np.random.Generator, hard_rate: float = HARD_RATE) -> CaseSpec:
    """Decide modality, geometry and difficulty of case ``index`` (beyond the shipped schedule each hard
    kind occurs with probability ``hard_rate``)."""
    if index < DEFAULT_COUNT:
        hard = HARD_CASES.get(index, ())
        lesion = index not in NO_LESION
        flipped = FLIPPED_AXES.get(index, ())
    else:
        hard = tuple(k for k in HARD_KINDS if rng.uniform() < hard_rate)
        lesion = bool(rng.uniform() < 0.85)
        flipped = (0, 1) if rng.uniform() < 0.1 else ()
    modality = "ct" if index % 2 == 0 else "mri"
    if modality == "ct":
        storage = "int16"
    else:
        storage = "float32" if index % 4 == 1 else "int16_scaled"
    inplane = round(float(rng.uniform(0.8, 1.2)), 3)
    slice_ = round(float(rng.uniform(1.5, 3.0)), 3)
    return CaseSpec(
        name=f"phantom_{index:03d}",
        modality=modality,
        storage=storage,
        spacing=(inplane, inplane, slice_),
        flipped_axes=tuple(flipped),
        hard=tuple(hard),
        lesion=lesion,
    )


def case_affine(spec: CaseSpec, rng: np.random.Generator) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine; flipped axes get a negative direction, same world box."""
    spacing = np.asarray(spec.spacing)
    centre = rng.uniform(-20.0, 20.0, size=3).round(2)
    affine = np.eye(4)
    half = (np.asarray(SHAPE) - 1) / 2.0
    for axis in range(3):
        sign = -1.0 if axis in spec.flipped_axes else 1.0
        affine[axis, axis] = sign * spacing[axis]
        affine[axis, 3] = centre[axis] - sign * spacing[axis] * half[axis]
    return affine


def rater_labels(
    rng: np.random.Generator,
    points: np.ndarray,
    organ_sdf: np.ndarray,
    lesion_sdf: np.ndarray | None,
    voxel_mm: float,
    lesion_uncertain: bool,
) -> list[np.ndarray]:
    """Three annotations: the true surfaces shifted by a constant and a smooth random offset."""
    labels = []
    for _ in RATERS:
        lab = np.zeros(SHAPE, dtype=np.uint8)
        shift = rng.uniform(-0.6, 0.6) * voxel_mm
        wiggle = 0.5 * voxel_mm * random_waves(rng, points, (12.0, 30.0), count=6)
        lab[organ_sdf + shift + wiggle < 0] = 1
        if lesion_sdf is not None:
            scale = 1.6 if lesion_uncertain else 0.7
            shift = rng.uniform(-1.0, 1.0) * scale * voxel_mm
            wiggle = scale * voxel_mm * random_waves(rng, points, (6.0, 15.0), count=6)
            lab[lesion_sdf + shift + wiggle < 0] = 2
        labels.append(lab)
    return labels


def make_case(
    index: int, seed: int = DEFAULT_SEED, hard_rate: float = HARD_RATE, outlier_rate: float = 0.0
) -> tuple[nib.Nifti1Image, dict[str, nib.Nifti1Image], CaseSpec]:
    """Build the image, the labels (``final`` and each rater) and the spec of case ``index``."""
    rng = np.random.default_rng([seed, index])
    spec = case_spec(index, rng, hard_rate)
    # decided by its own generator: every other case stays byte-identical whatever the rate
    if index >= DEFAULT_COUNT and np.random.default_rng([seed, index, 1]).uniform() < outlier_rate:
        spec.hard = (*spec.hard, OUTLIER)
    affine = case_affine(spec, rng)
    points = world_grid(affine)
    world_centre = affine[:3, :3] @ ((np.asarray(SHAPE) - 1) / 2.0) + affine[:3, 3]
    half_extent = np.asarray(spec.spacing) * np.asarray(SHAPE) / 2.0
    voxel_mm = spec.spacing[0]
    pv_width = float(np.mean(spec.spacing))

    # organ
    organ_centre = world_centre + rng.uniform(-0.12, 0.12, size=3) * half_extent
    organ_radii = rng.uniform(0.42, 0.6, size=3) * half_extent
    organ_radii[2] = min(organ_radii[2], 0.6 * half_extent[2])
    organ = blob_sdf(rng, points, organ_centre, organ_radii, wobble=0.12, wavelength=(25.0, 60.0))

    # lesion, inside the organ or straddling its boundary
    lesion = None
    if spec.lesion:
        small = "small_lesion" in spec.hard
        radius = rng.uniform(2.4, 3.2) if small else rng.uniform(4.0, 8.0)
        spec.lesion_touches_boundary = bool(rng.uniform() < 0.3)
        if spec.lesion_touches_boundary:
            candidates = np.argwhere(np.abs(organ) < 0.75 * voxel_mm)
        else:
            candidates = np.argwhere(organ < -(radius + 1.5))
            if len(candidates) == 0:
                candidates = np.argwhere(organ < -1.0)
        pick = candidates[rng.integers(len(candidates))]
        lesion_centre = points[:, pick[0], pick[1], pick[2]]
        lesion_radii = radius * rng.uniform(0.8, 1.2, size=3)
        lesion = blob_sdf(rng, points, lesion_centre, lesion_radii, wobble=0.15, wavelength=(10.0, 25.0))

    # distractors: unlabelled structures, one organ-like, one bright (bone/fat-like)
    distractors = []
    for _ in range(2):
        d_centre = world_centre + rng.uniform(-0.8, 0.8, size=3) * half_extent
        d_radii = rng.uniform(0.12, 0.25, size=3) * half_extent
        d_sdf = blob_sdf(rng, points, d_centre, d_radii, wobble=0.1, wavelength=(15.0, 40.0))
        distractors.append(np.maximum(d_sdf, -organ))  # never overlap the organ

    # annotations
    raters = rater_labels(rng, points, organ, lesion, voxel_mm, "low_contrast" in spec.hard)
    final = np.median(np.stack(raters), axis=0).astype(np.uint8)  # majority of three
    spec.voxels = {name: int((final == value).sum()) for name, value in LABELS.items() if value}

    # intensities in tissue units
    organ_occ = occupancy(organ, pv_width)
    lesion_occ = occupancy(lesion, pv_width) if lesion is not None else np.zeros(SHAPE)
    d_occ = [occupancy(d, pv_width) for d in distractors]
    patches = 1.0 / (1.0 + np.exp(-2.5 * random_waves(rng, points, (20.0, 50.0))))
    texture = random_waves(rng, points, (4.0, 10.0))
    lesion_sign = 1.0 if rng.uniform() < 0.35 else -1.0
    low = "low_contrast" in spec.hard

    if spec.modality == "ct":
        organ_mean = rng.uniform(40.0, 80.0)
        lesion_mean = organ_mean + lesion_sign * (rng.uniform(6.0, 10.0) if low else rng.uniform(25.0, 50.0))
        background = -100.0 + 140.0 * patches
        image = background
        image = image * (1 - d_occ[0]) + (organ_mean + rng.choice([-25.0, 25.0])) * d_occ[0]
        image = image * (1 - d_occ[1]) + rng.uniform(150.0, 200.0) * d_occ[1]
        image = image * (1 - organ_occ) + (organ_mean + 4.0 * texture) * organ_occ
        image = image * (1 - lesion_occ) + (lesion_mean + 3.0 * texture) * lesion_occ
        noise_sigma = rng.uniform(28.0, 40.0) if "noise" in spec.hard else rng.uniform(6.0, 12.0)
    else:
        organ_mean = rng.uniform(0.7, 1.0)
        contrast = rng.uniform(0.05, 0.09) if low else rng.uniform(0.25, 0.45)
        lesion_mean = organ_mean * (1.0 + lesion_sign * contrast)
        background = 0.15 + 0.35 * patches
        image = background
        image = image * (1 - d_occ[0]) + organ_mean * rng.choice([0.75, 1.25]) * d_occ[0]
        image = image * (1 - d_occ[1]) + rng.uniform(1.2, 1.4) * d_occ[1]
        image = image * (1 - organ_occ) + organ_mean * (1.0 + 0.03 * texture) * organ_occ
        image = image * (1 - lesion_occ) + lesion_mean * (1.0 + 0.03 * texture) * lesion_occ
        noise_sigma = rng.uniform(0.08, 0.12) if "noise" in spec.hard else rng.uniform(0.015, 0.035)

    # acquisition: point spread, bias field, noise
    sigma = (1.6, 1.6, 0.9) if "blur" in spec.hard else (0.5, 0.5, 0.3)
    if OUTLIER in spec.hard:
        sigma, noise_sigma = (2.5, 2.5, 1.2), 5.0 * noise_sigma
    image = gaussian_blur(image, sigma)
    bias = random_waves(rng, points, (60.0, 140.0), count=4)
    strong_bias = "bias" in spec.hard
    if spec.modality == "ct":
        if strong_bias:
            image = image + 45.0 * bias
        image = image + noise_sigma * rng.normal(size=SHAPE)
        data = np.clip(np.round(image), -1024, 3071).astype(np.int16)
        disk_dtype = None
    else:
        image = image * np.exp((0.35 if strong_bias else 0.08) * bias)
        real = image + noise_sigma * rng.normal(size=SHAPE)
        imag = noise_sigma * rng.normal(size=SHAPE)
        image = np.sqrt(real**2 + imag**2)  # Rician magnitude noise
        scale = rng.uniform(400.0, 2400.0)
        image = image * scale
        data = image.astype(np.float32)
        # "int16_scaled": nibabel stores float data as int16 plus scl_slope/scl_inter
        disk_dtype = np.int16 if spec.storage == "int16_scaled" else None

    image_nii = to_nifti(data, affine, f"segdiff phantom {spec.modality}", disk_dtype)
    label_niis = {"final": to_nifti(final, affine, "segdiff phantom label final")}
    for tag, lab in zip(RATERS, raters):
        label_niis[tag] = to_nifti(lab, affine, f"segdiff phantom label {tag}")
    return image_nii, label_niis, spec


def to_nifti(
    data: np.ndarray, affine: np.ndarray, description: str, disk_dtype: type | None = None
) -> nib.Nifti1Image:
    """A NIfTI-1 image with matching qform/sform (scanner coordinates, mm).

    ``disk_dtype`` (e.g. int16 for float data) makes nibabel store scaled integers.
    """
    header = nib.Nifti1Header()
    header.set_data_dtype(disk_dtype or data.dtype)
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    return img


def save(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` (nibabel's gzip writer is deterministic: no time stamp in the stream)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def generate(
    output: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, hard_rate: float = HARD_RATE,
    outlier_rate: float = 0.0,
) -> list[CaseSpec]:
    """Write ``count`` cases as a MONAI Label studies folder under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    specs = []
    for index in range(count):
        image, labels, spec = make_case(index, seed, hard_rate, outlier_rate)
        save(image, output / f"{spec.name}.nii.gz")
        for tag, lab in labels.items():
            save(lab, output / "labels" / tag / f"{spec.name}.nii.gz")
        specs.append(spec)
        print(f"{spec.name}: {spec.modality:3s} {spec.storage:12s} spacing={spec.spacing} "
              f"flip={spec.flipped_axes} hard={','.join(spec.hard) or '-'} voxels={spec.voxels}")
    (output / "labels.json").write_text(json.dumps(LABELS, indent=2) + "\n")
    cases = {"seed": seed, "shape": list(SHAPE), "cases": [asdict(s) for s in specs]}
    (output / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="studies folder to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of cases")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base random seed")
    parser.add_argument("--hard-rate", type=float, default=HARD_RATE,
                        help="chance of each hard kind in a case beyond the first 28 (more for training sets "
                        "with more hard cases)")
    parser.add_argument("--outlier-rate", type=float, default=0.0,
                        help=f"chance of an outlier ({OUTLIER!r}: a failed acquisition) in a case beyond the first 28")
    args = parser.parse_args(argv)
    generate(args.output, args.count, args.seed, args.hard_rate, args.outlier_rate)


if __name__ == "__main__":
    main()
