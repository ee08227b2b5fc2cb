#!/usr/bin/env python
"""Generate the synthetic multi-modal studies folder shipped in ``sample-data/multimodal``.

Each case is a small MRI-like head volume (48 x 48 x 20 voxels, 1 x 1 x 2 mm) seen in three
co-registered "sequences" (channels ``flair``, ``t1ce``, ``t2``), stored one file per channel with
nnU-Net's naming (``mm_000_0000.nii.gz`` ... ``mm_000_0002.nii.gz``; ``channels.json`` declares them).

The target ``tumour`` (label 1) is the union of three touching sub-blobs. Each channel shows only its
own sub-blob (hyperintense in that channel, invisible -- same intensity as the tissue -- in the other
two), so no single channel shows the whole tumour. A decoy blob that is bright in *every* channel (not
labelled) sits elsewhere in the head, so a bright spot in one channel alone does not decide it either:
a model must combine all channels.

Every case is seeded by ``(seed, index)`` alone: ``--count 2`` reproduces the first two shipped cases
exactly, and repeated runs give identical arrays.

Usage::

    python sample-data/make_multimodal.py                    # the shipped set (12 cases)
    python sample-data/make_multimodal.py --output /tmp/mm --count 40 --seed 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (48, 48, 20)
SPACING = (1.0, 1.0, 2.0)
DEFAULT_COUNT = 12
DEFAULT_SEED = 77
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "multimodal"
CHANNELS = ("flair", "t1ce", "t2")
TISSUE = (110.0, 130.0, 95.0)  # tissue intensity per channel
LABELS = {"background": 0, "tumour": 1}


def world() -> np.ndarray:
    """Voxel centres in mm relative to the volume centre, ``[3, X, Y, Z]``."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij"))
    centre = (np.array(SHAPE, dtype=np.float64) - 1) / 2
    return (grid - centre[:, None, None, None]) * np.array(SPACING)[:, None, None, None]


def occupancy(sdf: np.ndarray, width: float = 0.6) -> np.ndarray:
    """Soft inside-ness of a signed distance (mm): partial-volume edges."""
    return 1 / (1 + np.exp(np.clip(sdf / width, -50, 50)))


def ellipsoid_sdf(xyz: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of an axis-aligned ellipsoid."""
    rel = (xyz - centre[:, None, None, None]) / radii[:, None, None, None]
    return (np.sqrt((rel**2).sum(0)) - 1) * radii.min()


def smooth_field(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field (bias / texture) of relative amplitude ``strength``."""
    xyz = world() / 24.0
    field = np.zeros(SHAPE)
    for _ in range(3):
        k = rng.normal(0, 1.5, 3)
        field += np.cos(np.tensordot(k, xyz, 1) + rng.uniform(0, 2 * np.pi))
    return 1 + strength * field / 3


def make_case(index: int, seed: int = DEFAULT_SEED) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """``([channel arrays int16], label uint8, parts uint8, description)``; ``parts`` (not shipped) holds
    k + 1 more than 1 mm inside sub-blob k (the one channel k shows) and outside the others, else 0."""
    rng = np.random.default_rng([seed, index])
    xyz = world()
    head = occupancy(ellipsoid_sdf(xyz, rng.normal(0, 0.8, 3), np.array([21.0, 22.0, 17.0]) * rng.uniform(0.95, 1.05)))

    # tumour: three sub-blobs around a centre, at 120 degrees in a randomly rotated plane
    centre = np.array([rng.uniform(-7, 7), rng.uniform(-7, 7), rng.uniform(-4, 4)])
    rot = rng.uniform(0, 2 * np.pi)
    parts = []
    for k in range(3):
        a = rot + 2 * np.pi * k / 3
        offset = rng.uniform(3.5, 5.0) * np.array([np.cos(a), np.sin(a), rng.uniform(-0.3, 0.3)])
        radii = np.array([rng.uniform(3.5, 5.5), rng.uniform(3.5, 5.5), rng.uniform(4.0, 6.0)])
        parts.append(ellipsoid_sdf(xyz, centre + offset, radii))
    # decoy: bright in every channel, on the other side of the head
    side = -np.sign(centre[:2] + 1e-3) * rng.uniform(8, 11, 2)
    decoy = ellipsoid_sdf(xyz, np.array([side[0], side[1], rng.uniform(-4, 4)]), rng.uniform(3.0, 4.5, 3))

    label = (np.minimum.reduce(parts) < 0).astype(np.uint8)
    part_map = np.zeros(SHAPE, np.uint8)
    for k, sdf in enumerate(parts):
        part_map[(sdf < -1) & np.all([other > 1 for j, other in enumerate(parts) if j != k], axis=0)] = k + 1
    bias = smooth_field(rng, 0.08)
    contrast = rng.uniform(0.45, 0.7)
    channels = []
    for c, tissue in enumerate(TISSUE):
        texture = smooth_field(rng, 0.04)
        img = tissue * head * texture
        img = img * (1 + contrast * occupancy(parts[c])) * (1 + contrast * occupancy(decoy))
        img = img * bias + np.abs(rng.normal(0, 0.045 * tissue, SHAPE))  # Rician-like floor + noise
        channels.append(np.clip(np.rint(img), 0, 32767).astype(np.int16))
    spec = {"index": index, "contrast": round(float(contrast), 3), "tumour_voxels": int(label.sum()),
            "part_voxels": [int((p < 0).sum()) for p in parts]}
    return channels, label, part_map, spec


def affine() -> np.ndarray:
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = -(np.array(SHAPE) - 1) / 2 * np.array(SPACING)
    return aff


def save(array: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine())
    img.header.set_xyzt_units("mm")
    img.set_qform(affine(), code=1)
    img.set_sform(affine(), code=1)
    nib.save(img, path)


def generate(output: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict]:
    (output / "labels" / "final").mkdir(parents=True, exist_ok=True)
    specs = []
    for i in range(count):
        case = f"mm_{i:03d}"
        channels, label, _, spec = make_case(i, seed)
        for c, arr in enumerate(channels):
            save(arr, output / f"{case}_{c:04d}.nii.gz")
        save(label, output / "labels" / "final" / f"{case}.nii.gz")
        specs.append({"name": case, **spec})
    (output / "labels.json").write_text(json.dumps(LABELS, indent=2) + "\n")
    (output / "channels.json").write_text(json.dumps(list(CHANNELS)) + "\n")
    (output / "cases.json").write_text(json.dumps({"seed": seed, "shape": list(SHAPE), "cases": specs}, indent=1) + "\n")
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="studies folder to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of cases")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base random seed")
    args = parser.parse_args(argv)
    specs = generate(args.output, args.count, args.seed)
    print(f"wrote {len(specs)} cases to {args.output}")


if __name__ == "__main__":
    main()
