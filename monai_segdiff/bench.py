"""``segdiff bench``: the performance comparisons of the performance issue, measured side by side in
one process on the same network and the same volume, medians over repeats, written as JSON.

P1  seed sampler (1000-step DDPM, N members one after another, batch 1) vs segdiff's default
    sampler: time ratio and Dice difference (the seed sampler is timed on a few slices and
    extrapolated to the volume; the output says so).
P2  segdiff infer (N samples + uncertainty) vs a MONAI UNet of comparable capacity with MC-dropout
    (N passes): time ratio.
P3  peak resident memory of an infer on a CT-sized volume (run in a child process).
P4  active-learning scoring throughput (volumes per minute) vs one training epoch's time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data, metrics
from .config import SegDiffConfig, load_checkpoint
from .diffusion.inferer import SegDiffInferer
from .diffusion.sampler import DiffusionSampler, MCDropoutSampler
from .io import write_json
from .networks import build_network
from .segmenter import Segmenter
from .training import train
from .transforms import apply, preprocess_transforms


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def preprocessed_case(cfg: SegDiffConfig, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [C, ...], label map [...])`` of a labelled item, on the model's working grid."""
    d = apply(preprocess_transforms(cfg, label_keys=["label"]), {"image": item["image"], "label": item["label"]})
    return d["image"].as_tensor().float(), d["label"].as_tensor()[0].long()


def p1_seed_sampler(
    net, cfg: SegDiffConfig, item: dict, samples: int, seed_slices: int, repeats: int, timed_steps: int | None = None
) -> dict:
    """Default few-step sampler on the whole volume vs 1000-step DDPM, members one by one, batch 1.

    The seed procedure is timed on ``seed_slices`` foreground slices, running ``timed_steps`` of its
    DDPM steps per member (all of them when None) and extrapolated linearly to every step and slice
    (its cost is one network call per step, member and slice). Its Dice comes from the full
    1000-step chain on the same slices with the members batched (same arithmetic, less waiting).
    """
    img, lab = preprocessed_case(cfg, item)
    fast = DiffusionSampler(cfg)
    fast_inf = SegDiffInferer(fast.probabilities, samples, cfg.num_classes, 2, cfg.context, cfg.divisor, seed=0)
    t_fast, out = _median_time(lambda: fast_inf(img, net), repeats)
    depth = img.shape[-1]
    fg = torch.nonzero(lab.sum((0, 1)) > 0).flatten().tolist() or list(range(depth))
    # evenly inside the foreground range, ends excluded (an edge slice holds slivers: unstable Dice)
    n = min(seed_slices, len(fg))
    zs = [fg[int(round(i))] for i in np.linspace(0, len(fg) - 1, n + 2)[1:-1]]
    slow = DiffusionSampler(cfg, method="ddpm")
    total_steps = slow.num_evaluations
    timed = DiffusionSampler(cfg, method="ddpm")
    timed.scheduler.timesteps = timed.scheduler.timesteps[: timed_steps or total_steps]
    one_member = SegDiffInferer(lambda n, b, k, g: timed.probabilities(n, b, 1, g), 1, cfg.num_classes, 2,
                                cfg.context, cfg.divisor, seed=None)
    batched = SegDiffInferer(slow.probabilities, samples, cfg.num_classes, 2, cfg.context, cfg.divisor, seed=0)
    t_seed, dice_slow, dice_fast = 0.0, [], []
    for z in zs:
        lo = max(0, z - cfg.context)
        sub, zi = img[..., lo: z + cfg.context + 1], z - lo
        t0 = time.perf_counter()
        for _ in range(samples):  # one member after another, batch 1
            one_member(sub, net)
        t_seed += time.perf_counter() - t0
        pred_slow = batched(sub, net).probs[..., zi].argmax(0)
        dice_slow.append(np.nanmean(metrics.dice_per_label(pred_slow, lab[..., z], cfg.num_classes)))
        dice_fast.append(np.nanmean(metrics.dice_per_label(out.probs[..., z].argmax(0), lab[..., z], cfg.num_classes)))
    n_timed = len(timed.scheduler.timesteps)
    t_slow = t_seed / len(zs) * depth * total_steps / n_timed
    return {
        "p1_speedup_vs_seed_sampler": t_slow / t_fast,
        "p1_dice_delta": float(np.mean(dice_fast) - np.mean(dice_slow)),
        "p1_fast_seconds_volume": t_fast,
        "p1_seed_seconds_volume_extrapolated": t_slow,
        "p1_seed_slices_timed": len(zs),
        "p1_seed_steps_timed": n_timed,
        "p1_note": f"seed sampler timed on {len(zs)} foreground slices x {n_timed} of its {total_steps} steps "
                   f"and extrapolated to {depth} slices x {total_steps} steps; Dice of the full "
                   f"{total_steps}-step chain compared on those slices",
    }


def p2_vs_mc_dropout(net, cfg: SegDiffConfig, image: torch.Tensor, samples: int, repeats: int) -> dict:
    """segdiff vs MC-dropout UNet (16-128 channels, N passes) on the same preprocessed volume."""
    ucfg = cfg.replace(network="unet", channels=[16, 32, 64, 128], attention_levels=[False] * 4, context=cfg.context)
    unet = build_network(ucfg).eval()
    mc = MCDropoutSampler(ucfg)
    fast = DiffusionSampler(cfg)
    seg_inf = SegDiffInferer(fast.probabilities, samples, cfg.num_classes, 2, cfg.context, cfg.divisor, seed=0)
    mc_inf = SegDiffInferer(mc.probabilities, samples, cfg.num_classes, 2, ucfg.context, ucfg.divisor, seed=0)
    t_seg, _ = _median_time(lambda: seg_inf(image, net), repeats)
    t_mc, _ = _median_time(lambda: mc_inf(image, unet), repeats)
    return {"p2_time_ratio_vs_mc_dropout_unet": t_seg / t_mc, "p2_segdiff_seconds": t_seg,
            "p2_mc_dropout_seconds": t_mc, "p2_volume_shape": list(image.shape[1:])}


def p3_peak_rss(model: str, shape: tuple[int, int, int], samples: int, spacing: tuple[float, ...]) -> dict:
    """Peak RSS (GiB) of ``Segmenter`` on a synthetic CT-sized volume, in a fresh child process."""
    code = (
        "import resource, sys, torch\n"
        "from monai.data import MetaTensor\n"
        "from monai_segdiff.segmenter import Segmenter\n"
        f"shape={tuple(shape)!r}; sp={tuple(spacing)!r}\n"
        "aff=torch.diag(torch.tensor([*sp,1.0],dtype=torch.float64))\n"
        "img=MetaTensor(torch.randn(1,*shape)*300,affine=aff)\n"
        f"seg=Segmenter.from_checkpoint({model!r}, num_samples={samples})\n"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "seg(img)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    peak_kib, base_kib = (int(v) for v in proc.stdout.split()[-2:])
    return {"p3_peak_rss_gib": peak_kib / 2**20, "p3_baseline_rss_gib": base_kib / 2**20,
            "p3_volume_shape": list(shape), "p3_spacing": list(spacing), "p3_seconds": time.perf_counter() - t0}


def p4_scoring(model: str, cfg: SegDiffConfig, items: list[dict], samples: int, steps: int) -> dict:
    """Unlabelled volumes scored per minute (the app's scoring settings) vs one training epoch."""
    seg = Segmenter.from_checkpoint(model, num_samples=samples, steps=steps, tta_flips=1)  # as the app scores
    t0 = time.perf_counter()
    for it in items:
        seg(it["image"])
    t_score = time.perf_counter() - t0
    state, _, _ = load_checkpoint(model)
    res = train(cfg, items, (), output=None, epochs=1, init_state=state)
    return {"p4_scoring_volumes_per_minute": 60 * len(items) / t_score, "p4_scoring_seconds": t_score,
            "p4_volumes": len(items), "p4_train_epoch_seconds": res.seconds,
            "p4_scoring_vs_epoch": t_score / res.seconds}


def run(model: str, studies: str, quick: bool = True, samples: int = 5, repeats: int | None = None) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state, cfg, _ = load_checkpoint(model)
    net = build_network(cfg)
    net.load_state_dict(state)
    net.eval()
    items = data.labelled(data.datalist(studies))
    repeats = repeats or (1 if quick else 3)
    out: dict = {"settings": {"model": model, "studies": studies, "quick": quick, "samples": samples,
                              "steps": cfg.sample_steps, "network": cfg.network, "channels": cfg.channels,
                              "threads": torch.get_num_threads(), "repeats": repeats}}
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log("P1 seed sampler vs default")
    out.update(p1_seed_sampler(net, cfg, items[0], samples, 1 if quick else 6, repeats, 50 if quick else None))
    log("P2 vs MC-dropout UNet")
    # P2 on a 128x128x64 volume as in the measured UNet numbers: the first case resampled up
    img = preprocessed_case(cfg, items[0])[0]
    vol = torch.nn.functional.interpolate(img[None], size=(128, 128, 32 if quick else 64), mode="trilinear")[0]
    out.update(p2_vs_mc_dropout(net, cfg, vol, samples, repeats))
    log("P3 peak memory, CT-sized volume")
    shape = (512, 512, 12) if quick else (512, 512, 300)
    out.update(p3_peak_rss(model, shape, samples, (0.7, 0.7, 1.0)))
    log("P4 scoring throughput vs one epoch")
    out.update(p4_scoring(model, cfg, items[: 3 if quick else 12], 3, 2))
    log("done")
    return out


def main_bench(args) -> int:
    result = run(args.model, args.studies, quick=args.quick, samples=args.samples)
    text = json.dumps(result, indent=2)
    if args.output:
        write_json(result, Path(args.output))
    print(text)
    print("\n| metric | value |\n|---|---|")
    for k, v in result.items():
        if k != "settings":
            print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return 0

