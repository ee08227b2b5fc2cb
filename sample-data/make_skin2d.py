#!/usr/bin/env python
"""Generate the synthetic 2D "skin lesion" studies folder shipped in ``sample-data/skin2d``.

Each case is a small RGB dermoscopy-like picture (96 x 96 PNG) of one pigmented lesion:

* skin: a skin-coloured background (tone varies per case) with low-frequency blotches, fine pore-like
  texture, uneven illumination (vignetting and a gradient) and pixel noise;
* lesion: an irregular blob (a rotated ellipse whose radius is deformed by a few random angular waves)
  with a fuzzy border of varying width, brown with darker inner structure; some are low-contrast
  (close to the skin colour);
* occluders: dark curved hairs over the lesion and skin on some cases (the mask still covers the
  lesion under a hair, as in dermoscopy references), and small unlabelled freckles on others.

Three simulated annotators (``labels/rater1..3``) draw the boundary shifted in or out and smoothly
perturbed, more for fuzzier borders; ``labels/final`` is their pixel-wise majority vote. Masks are
8-bit grayscale PNGs with the values 0 / 255 (the usual binary-mask convention; monai-segdiff reads
them as 0 / 1).

Every case is seeded by ``(seed, index)`` alone, so ``--count 2`` reproduces the first two shipped
cases exactly, and repeated runs give identical pixels.

Usage::

    python sample-data/make_skin2d.py                      # the shipped set (20 cases)
    python sample-data/make_skin2d.py --output /tmp/skin --count 100 --seed 7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 96
DEFAULT_COUNT = 20
DEFAULT_SEED = 2024
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "skin2d"
RATERS = ("rater1", "rater2", "rater3")
LABELS = {"background": 0, "lesion": 1}
LIGHT_SKIN, DARK_SKIN = np.array([238.0, 203.0, 178.0]), np.array([186.0, 134.0, 100.0])
LESION_BROWN = np.array([128.0, 80.0, 52.0])
HAIR = np.array([42.0, 30.0, 24.0])


def smooth_noise(rng: np.random.Generator, sigma: float, size: int = SIZE) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` pixels (periodic, via FFT), unit std."""
    white = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    gauss = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    out = np.fft.ifft2(np.fft.fft2(white) * gauss).real
    return (out - out.mean()) / (out.std() + 1e-12)


def lesion_radius(rng: np.random.Generator, r0: float) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes and phases of the angular waves ``k = 2..5`` deforming the lesion outline."""
    amps = np.array([rng.uniform(0.0, 0.16 / k**0.5) for k in range(2, 6)]) * r0
    phases = rng.uniform(0, 2 * np.pi, 4)
    return amps, phases


def outline(theta: np.ndarray, r0: float, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    r = np.full_like(theta, r0)
    for k, (a, p) in enumerate(zip(amps, phases), start=2):
        r += a * np.cos(k * theta + p)
    return np.maximum(r, 0.3 * r0)


def polar(centre: np.ndarray, angle: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of every pixel in the lesion's rotated, stretched frame."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / aspect
    return np.hypot(u, v), np.arctan2(v, u)


def hair_mask(rng: np.random.Generator, count: int) -> np.ndarray:
    """Opacity in [0, 1] of ``count`` thin curved hairs (quadratic Bezier curves)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    alpha = np.zeros((SIZE, SIZE))
    for _ in range(count):
        start = rng.uniform(-10, SIZE + 10, 2)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(60, 140)
        end = start + length * np.array([np.sin(angle), np.cos(angle)])
        ctrl = (start + end) / 2 + rng.uniform(-25, 25, 2)
        t = np.linspace(0, 1, 160)[:, None]
        pts = (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end  # [160, 2] (y, x)
        dist = np.full((SIZE, SIZE), np.inf)
        for y, x in pts:
            dist = np.minimum(dist, np.hypot(yy - y, xx - x))
        width = rng.uniform(0.5, 1.0)
        alpha = np.maximum(alpha, rng.uniform(0.75, 0.95) * np.exp(-((dist / width) ** 2)))
    return alpha


def make_case(index: int, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """``(rgb uint8 [H, W, 3], {tag: mask uint8 0/255 [H, W]}, case description)``."""
    rng = np.random.default_rng([seed, index])
    low_contrast = index % 6 == 4
    hairs = int(rng.integers(2, 7)) if index % 5 in (1, 3) else 0
    freckles = int(rng.integers(1, 4)) if index % 4 == 2 else 0

    # skin
    tone = rng.uniform(0.0, 1.0)
    skin = (1 - tone) * LIGHT_SKIN + tone * DARK_SKIN
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1) - 0.5
    g = rng.uniform(-1, 1, 2)
    light = (1 - 0.35 * (yy**2 + xx**2)) * (1 + 0.08 * (g[0] * yy + g[1] * xx))
    texture = 1 + 0.045 * smooth_noise(rng, 9.0) + 0.025 * smooth_noise(rng, 1.0)
    img = skin[None, None, :] * (texture * light)[..., None]

    # lesion
    centre = SIZE / 2 + rng.uniform(-13, 13, 2)
    r0 = rng.uniform(11, 23)
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.7, 1.0)
    amps, phases = lesion_radius(rng, r0)
    rho, theta = polar(centre, angle, aspect)
    r = outline(theta, r0, amps, phases)
    fuzz = rng.uniform(0.8, 3.2)
    alpha = 1 / (1 + np.exp(np.clip((rho - r) / fuzz, -50, 50)))
    darkness = rng.uniform(0.55, 0.95)
    colour = LESION_BROWN * darkness / 0.75
    if low_contrast:
        colour = 0.45 * colour + 0.55 * skin
    inner = np.clip(1 - rho / np.maximum(r, 1e-6), 0, 1)
    structure = (1 + 0.12 * smooth_noise(rng, 2.5)) * (1 - 0.25 * inner)
    lesion = colour[None, None, :] * (structure * light)[..., None]
    img = img * (1 - alpha[..., None]) + lesion * alpha[..., None]

    # unlabelled freckles and hairs on top
    for _ in range(freckles):
        fc = rng.uniform(8, SIZE - 8, 2)
        fr = rng.uniform(1.2, 2.4)
        d = np.hypot(np.mgrid[0:SIZE, 0:SIZE][0] - fc[0], np.mgrid[0:SIZE, 0:SIZE][1] - fc[1])
        fa = 0.7 / (1 + np.exp(np.clip((d - fr) / 0.6, -50, 50)))
        img = img * (1 - fa[..., None]) + (0.5 * colour + 0.5 * skin) * fa[..., None]
    if hairs:
        ha = hair_mask(rng, hairs)
        img = img * (1 - ha[..., None]) + HAIR * ha[..., None]
    img = img + rng.normal(0, 2.0, img.shape)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # raters: shifted and smoothly perturbed outlines (more where the border is fuzzy); final = majority
    masks = {}
    spread = 0.5 + 0.45 * fuzz
    for tag in RATERS:
        shift = rng.uniform(-1.0, 1.0) * spread
        wobble = sum(rng.uniform(0, 0.6 * spread / m) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (1, 2, 3))
        masks[tag] = rho < r + shift + wobble
    final = sum(masks[t].astype(np.uint8) for t in RATERS) >= 2
    out = {"final": final, **masks}
    spec = {
        "index": index, "hairs": hairs, "freckles": freckles, "low_contrast": low_contrast,
        "border_width_px": round(float(fuzz), 2), "radius_px": round(float(r0), 1),
        "lesion_pixels": int(final.sum()),
    }
    return rgb, {k: (v * 255).astype(np.uint8) for k, v in out.items()}, spec


def generate(output: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict]:
    for tag in ("final", *RATERS):
        (output / "labels" / tag).mkdir(parents=True, exist_ok=True)
    specs = []
    for i in range(count):
        name = f"skin_{i:03d}.png"
        rgb, masks, spec = make_case(i, seed)
        Image.fromarray(rgb, mode="RGB").save(output / name, optimize=True)
        for tag, mask in masks.items():
            Image.fromarray(mask, mode="L").save(output / "labels" / tag / name, optimize=True)
        specs.append({"name": name[:-4], **spec})
    (output / "labels.json").write_text(json.dumps(LABELS, indent=2) + "\n")
    (output / "cases.json").write_text(json.dumps({"seed": seed, "size": [SIZE, SIZE], "cases": specs}, indent=1) + "\n")
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
