"""Auto Segmentation speed on an MRI-sized volume, and active-learning scoring yielding to it.

usage::

    python benchmarks/auto_seg_speed.py [--parts shipped,new,concurrent-plain,concurrent-yield]
        [--repeats 3] [--shape 256,256,180] [--workdir /tmp/auto-seg-speed] [--scoring-copies 3]
        [--output benchmarks/auto-seg-speed.json]

Each part runs in its own invocation if wanted (results are merged into ``--output``), so a part
stays within a few minutes on a 2-core CPU; every ratio is measured inside one process, its two
sides interleaved (A, B, A, B, ...) so that load on a shared machine hits both alike; medians over
``--repeats``.

Parts:

``shipped`` / ``new``
    (a) an Auto Segmentation exactly as the app computes it: ``Segmenter.from_checkpoint(model)`` with
    the model's default ensemble, steps, views and clean-up, on the path of a synthetic 256x256x180
    MRI-like NIfTI at 1 mm in an LPS orientation (smooth blobs + noise; written once to
    ``--workdir``), load and resampling back included; for the shipped model
    (``apps/segdiff/model/segdiff.pt``) and for a new model as the app's trainer makes one for such
    data (``training.new_config(items, ["brain"], network="medsegdiff")``, random weights);
    (b) a MONAI ``UNet`` (16-128 channels, dropout 0.1) with 5 MC-dropout passes through the same
    ``Segmenter`` (same config apart from the network: preprocessing, clean-up and resampling back;
    one view); (c) the ratio (a)/(b) (goal <= 3) and the median seconds of each stage of the
    Segmenter (``Prediction.stats["timings"]``).
``concurrent-plain`` / ``concurrent-yield``
    (d) the new model's Auto Segmentation alone and while the app's scoring work runs in another
    process (``multiprocessing`` spawn: a ``Segmenter`` with 3 samples x 2 steps, one view, over
    ``--scoring-copies`` copies of the volume, round and round), without (``plain``) and with
    (``yield``) the scoring's measures: ``busy.lower_priority()`` (nice 19, one torch thread) and
    ``BusyMarker.wait_until_idle()`` before each image, the infer holding the marker as the app's
    infer task does. For the runs "alone" the scoring process is stopped (SIGSTOP) and resumed
    after. Ratio with scoring / alone (goal <= 1.2).

The JSON holds every run's seconds and stage timings; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "apps" / "segdiff" / "model" / "segdiff.pt"
PARTS = ("shipped", "new", "concurrent-plain", "concurrent-yield")
STAGES = ("load_s", "preprocess_s", "ensemble_s", "uncertainty_s", "postprocess_s", "resample_s", "statistics_s")


def log(msg: str) -> None:
    print(f"[auto-seg {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data and models ---------------------------------------------------------------------------------
def synthetic_mri(path: Path, shape: tuple[int, int, int] = (256, 256, 180), seed: int = 0) -> Path:
    """An MRI-like volume: a bright ellipsoid ("brain") with smooth blobs inside, Gaussian-smoothed,
    plus noise; float32 NIfTI at 1 mm whose axes run to Left, Posterior, Superior (an LPS voxel order,
    so the model's RAS reorientation and the resampling back are exercised). Also writes the
    ellipsoid as a label (``<name>_label.nii.gz``) for the new model's config."""
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, np.float32) / 2
    radii = np.array(shape, np.float32) * np.array([0.35, 0.41, 0.39])
    brain = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) < 1
    img = np.where(brain, 600.0, 50.0).astype(np.float32)
    for _ in range(12):
        pos = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        size = rng.uniform(8, 25)
        img += rng.uniform(-250, 350) * np.exp(-sum(((grid[i] - pos[i]) / size) ** 2 for i in range(3)))
    img = ndimage.gaussian_filter(img, 2.0) + rng.normal(0, 30, shape).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [shape[0] / 2, shape[1] / 2, -shape[2] / 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(path))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(label_path(path)))
    return path


def label_path(image: Path) -> Path:
    return image.with_name(image.name.replace(".nii.gz", "_label.nii.gz"))


def new_model(image: Path, out: Path) -> Path:
    """The model the app's trainer would start from for this data: ``new_config`` + random weights."""
    from monai_segdiff.config import save_checkpoint
    from monai_segdiff.networks import build_network
    from monai_segdiff.training import new_config

    cfg = new_config([{"image": str(image), "label": str(label_path(image))}], ["brain"], network="medsegdiff")
    torch.manual_seed(0)
    save_checkpoint(out, build_network(cfg).state_dict(), cfg)
    return out


def unet_segmenter(cfg):
    """A MONAI UNet (16-128 channels, dropout from the config) with MC-dropout, everything else as ``cfg``."""
    from monai_segdiff.networks import build_network
    from monai_segdiff.segmenter import Segmenter

    ucfg = cfg.replace(network="unet", channels=[16, 32, 64, 128], attention_levels=[False] * 4,
                       norm_num_groups=16, tta_flips=1, extra={})
    torch.manual_seed(0)
    return Segmenter(build_network(ucfg), ucfg, num_samples=5)


def warm_up(seg, image: Path) -> None:
    """One call on a small crop with the volume's affine (allocators, lazy imports, MKL-DNN kernels)."""
    from monai_segdiff.segmenter import load_image

    img = load_image(image)
    crop = [slice(max(0, n // 2 - half), n // 2 + half) for n, half in zip(img.shape[1:], (32, 32, 8))]
    seg(img[(slice(None), *crop)])


def settings_of(seg) -> dict:
    cfg = seg.cfg
    return {"network": cfg.network, "channels": cfg.channels, "samples": seg.num_samples,
            "steps": getattr(seg.sampler, "num_evaluations", 1), "tta_flips": seg.tta_flips,
            "postprocess": list(seg.postprocess.ops), "spacing": cfg.spacing, "context": cfg.context,
            "anchor_share": cfg.anchor_share}


def summary(runs: list[dict]) -> dict:
    return {"median_s": statistics.median(r["total_s"] for r in runs), "runs_s": [r["total_s"] for r in runs],
            "stages_median_s": {k: statistics.median(r["timings"].get(k, 0.0) for r in runs) for k in STAGES},
            "runs": runs}


def timed(seg, image: Path) -> dict:
    t0 = time.perf_counter()
    pred = seg(str(image))
    total = time.perf_counter() - t0
    return {"total_s": total, "timings": pred.stats["timings"], "case_score": pred.stats["case_score"],
            "label_voxels": int((pred.label > 0).sum())}


# -- (a)-(c): model vs MC-dropout UNet -------------------------------------------------------------------
def model_vs_unet(model: Path, image: Path, repeats: int) -> dict:
    from monai_segdiff.segmenter import Segmenter

    seg = Segmenter.from_checkpoint(model)  # as the app's SegDiffModel builds it (model defaults)
    unet = unet_segmenter(seg.cfg)
    warm_up(seg, image)
    warm_up(unet, image)
    runs: dict[str, list] = {"segdiff": [], "unet": []}
    for r in range(repeats):
        for name, s in (("segdiff", seg), ("unet", unet)) if r % 2 == 0 else (("unet", unet), ("segdiff", seg)):
            runs[name].append(timed(s, image))
            log(f"{model.name} {name} run {r + 1}/{repeats}: {runs[name][-1]['total_s']:.1f} s")
    a, b = summary(runs["segdiff"]), summary(runs["unet"])
    return {"model": str(model), "segdiff": {**a, "settings": settings_of(seg)},
            "unet_mc_dropout": {**b, "settings": settings_of(unet)}, "ratio": a["median_s"] / b["median_s"]}


# -- (d): Auto Segmentation while scoring runs --------------------------------------------------------
def scoring_worker(model: str, images: list[str], key: str, measures: bool, started, counter) -> None:
    """The app's scoring work (3 samples x 2 steps, one view) over ``images``, round and round, until
    terminated; with ``measures`` as ``UncertaintyScoring`` does it (lower priority, wait for infers)."""
    from monai_segdiff.busy import BusyMarker, lower_priority
    from monai_segdiff.segmenter import Segmenter

    if measures:
        lower_priority()
    marker = BusyMarker(key)
    seg = Segmenter.from_checkpoint(model, num_samples=3, steps=2, tta_flips=1)
    started.set()
    while True:
        for image in images:
            if measures:
                marker.wait_until_idle()
            seg(image)
            with counter.get_lock():
                counter.value += 1


def concurrent(model: Path, image: Path, workdir: Path, copies: int, repeats: int, measures: bool) -> dict:
    from monai_segdiff.busy import BusyMarker
    from monai_segdiff.segmenter import Segmenter

    images = []
    for i in range(copies):
        dst = workdir / f"scoring_copy_{i}.nii.gz"
        if not dst.exists():
            shutil.copyfile(image, dst)
        images.append(str(dst))
    key = str(model.resolve())
    marker = BusyMarker(key)
    seg = Segmenter.from_checkpoint(model)
    warm_up(seg, image)
    ctx = mp.get_context("spawn")
    started, counter = ctx.Event(), ctx.Value("i", 0)
    worker = ctx.Process(target=scoring_worker, args=(str(model), images, key, measures, started, counter), daemon=True)
    worker.start()
    started.wait(300)
    time.sleep(3.0)  # let it get into its first image
    runs: dict[str, list] = {"alone": [], "with_scoring": []}
    scored: dict[str, int] = {"alone": 0, "with_scoring": 0}
    try:
        for r in range(repeats):
            order = ("alone", "with_scoring") if r % 2 == 0 else ("with_scoring", "alone")
            for phase in order:
                if phase == "alone":
                    os.kill(worker.pid, signal.SIGSTOP)
                before = counter.value
                if phase == "with_scoring" and measures:
                    with marker.hold():
                        runs[phase].append(timed(seg, image))
                else:
                    runs[phase].append(timed(seg, image))
                scored[phase] += counter.value - before
                if phase == "alone":
                    os.kill(worker.pid, signal.SIGCONT)
                    time.sleep(2.0)  # scoring back in its stride before the next run
                log(f"{'yield' if measures else 'plain'} {phase} run {r + 1}/{repeats}: {runs[phase][-1]['total_s']:.1f} s")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.terminate()
        worker.join(30)
    alone, busy = summary(runs["alone"]), summary(runs["with_scoring"])
    return {"model": str(model), "measures": measures, "scoring": {"samples": 3, "steps": 2, "tta_flips": 1,
            "copies": copies, "images_finished_during_timed_runs": scored},
            "alone": alone, "with_scoring": busy, "ratio": busy["median_s"] / alone["median_s"]}


# -- output ------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = ["| part | Auto Segmentation s (median) | UNet MC-dropout s | ratio | goal |", "|---|---|---|---|---|"]
    for part in ("shipped", "new"):
        r = result.get(part)
        if r:
            lines.append(f"| {part} ({r['segdiff']['settings']['samples']} x {r['segdiff']['settings']['steps']} steps x "
                         f"{r['segdiff']['settings']['tta_flips']} views) | {r['segdiff']['median_s']:.1f} | "
                         f"{r['unet_mc_dropout']['median_s']:.1f} | **{r['ratio']:.2f}x** | <= 3 |")
    stage_parts = [(p, m) for p in ("shipped", "new") if result.get(p) for m in ("segdiff", "unet_mc_dropout")]
    if stage_parts:
        lines += ["", "| stage (median s) | " + " | ".join(f"{p} {m}" for p, m in stage_parts) + " |",
                  "|---|" + "---|" * len(stage_parts)]
        for k in STAGES:
            lines.append(f"| {k[:-2]} | " + " | ".join(f"{result[p][m]['stages_median_s'][k]:.2f}" for p, m in stage_parts) + " |")
    conc = [(p, result[p]) for p in ("concurrent-plain", "concurrent-yield") if result.get(p)]
    if conc:
        lines += ["", "| new model, scoring process | alone s | with scoring s | ratio | goal |", "|---|---|---|---|---|"]
        for p, r in conc:
            what = "nice 19, 1 thread, waits for the infer" if r["measures"] else "no measures (2 threads, nice 0)"
            lines.append(f"| {what} | {r['alone']['median_s']:.1f} | {r['with_scoring']['median_s']:.1f} | "
                         f"**{r['ratio']:.2f}x** | <= 1.2 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", default="256,256,180")
    ap.add_argument("--workdir", default="/tmp/auto-seg-speed")
    ap.add_argument("--scoring-copies", type=int, default=3)
    ap.add_argument("--model", default=str(SHIPPED), help="the shipped model")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "auto-seg-speed.json"),
                    help="JSON file; parts already in it are kept unless run again")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    shape = tuple(int(v) for v in args.shape.split(","))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"mri_{'x'.join(map(str, shape))}.nii.gz"
    if not image.exists():
        log(f"writing {image}")
        synthetic_mri(image, shape)
    new = workdir / "new_medsegdiff.pt"
    if any(p != "shipped" for p in parts) and not new.exists():
        new_model(image, new)
    out = Path(args.output)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                         "python": platform.python_version()}
    result.setdefault("volume", {"shape": list(shape), "spacing_mm": [1.0, 1.0, 1.0], "orientation": "LPS",
                                 "file": image.name})
    for part in parts:
        log(f"part {part}")
        t0 = time.perf_counter()
        if part in ("shipped", "new"):
            result[part] = model_vs_unet(Path(args.model) if part == "shipped" else new, image, args.repeats)
        else:
            result[part] = concurrent(new, image, workdir, args.scoring_copies, args.repeats, part.endswith("yield"))
        result[part]["repeats"] = args.repeats
        result[part]["measured"] = time.strftime("%Y-%m-%d %H:%M")
        result[part]["command"] = "python benchmarks/auto_seg_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result[part]["part_seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
