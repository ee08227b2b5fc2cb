"""Leave-one-out on real scans: the project's default new model (MedSegDiff, what the app trains for a
user's label set) against a plain MONAI UNet (the library's ``unet`` network: MONAI's ``UNet``, Dice + CE)
trained for the same wall-clock minutes on the same folds, with the same data pipeline (spacing, patch
size and intensity chosen from the training cases, as for a new model in the app).

Each fold trains on every labelled case of a task but one (no validation split: all cases learn; the
last epoch is kept) and segments the left-out case with the model's default ensemble; Dice per label on
the case's own grid. The two models of a fold run one after the other in this process (2 cores: never
two at once).

    python sample-data/make_real_dev.py --output /tmp/real
    python benchmarks/real_loo.py --tasks /tmp/real/spine /tmp/real/abdomen --minutes 2 \
        --output benchmarks/real-loo.json
    python benchmarks/real_loo.py --tasks /tmp/real/spine --networks medsegdiff,medsegdiff_v2 --minutes 2 \
        --output benchmarks/real-loo-v2.json     # other networks side by side (session 15)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from monai_segdiff import data
from monai_segdiff.config import NETWORKS
from monai_segdiff.io import write_json
from monai_segdiff.labelset import label_names
from monai_segdiff.segmenter import Segmenter, load_label
from monai_segdiff.training import new_config, train

MODELS = {"segdiff (medsegdiff)": "medsegdiff", "MONAI UNet": "unet"}


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: list[str]) -> dict[str, float | None]:
    """Dice of each label present in the reference or the prediction (None: absent from both)."""
    out: dict[str, float | None] = {}
    for value, name in enumerate(labels, start=1):
        p, r = pred == value, ref == value
        size = int(p.sum() + r.sum())
        out[name] = 2.0 * float((p & r).sum()) / size if size else None
    return out


def fold(items: list[dict], held_out: dict, labels: list[str], network: str, minutes: float, work: Path) -> dict:
    """Train ``network`` on ``items`` minus ``held_out`` for ``minutes``; segment ``held_out``."""
    train_items = [it for it in items if it["id"] != held_out["id"]]
    cfg = new_config(train_items, labels, network=network)
    out = work / f"{network}-{held_out['id']}.pt"
    t0 = time.perf_counter()
    result = train(cfg, train_items, [], output=out, max_minutes=minutes, keep="last", seed=0)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = Segmenter.from_checkpoint(out)(held_out["image"]).label[0].numpy()
    infer_seconds = time.perf_counter() - t1
    ref = load_label(held_out["label"]).as_tensor()[0].numpy()
    dice = dice_per_label(pred, ref, labels)
    scored = [d for d in dice.values() if d is not None]
    return {"case": held_out["id"], "network": network, "train_seconds": round(seconds, 1),
            "steps": result.steps, "infer_seconds": round(infer_seconds, 2), "dice": dice,
            "mean_dice": statistics.fmean(scored) if scored else None,
            "spacing": cfg.spacing, "roi_size": cfg.roi_size, "intensity": cfg.intensity}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", type=Path, required=True, help="studies folders (make_real_dev.py)")
    ap.add_argument("--minutes", type=float, default=2.0, help="training minutes per model and fold")
    ap.add_argument("--output", type=Path, required=True, help="JSON file of the results")
    ap.add_argument("--networks", help=f"comma-separated, of {', '.join(NETWORKS)} (default: the app's new model "
                    "and the MONAI UNet)")
    args = ap.parse_args()
    models = MODELS if not args.networks else {n: n for n in args.networks.split(",")}
    unknown = [n for n in models.values() if n not in NETWORKS]
    if unknown:
        ap.error(f"unknown networks {unknown}; use {', '.join(NETWORKS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            items = [dict(d, id=data.image_id(d["image"])) for d in data.labelled(data.datalist(task))]
            labels = label_names(task, items)
            for held_out in items:
                for model, network in models.items():
                    row = {"task": task.name, "model": model,
                           **fold(items, held_out, labels, network, args.minutes, Path(tmp))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_json({"minutes": args.minutes, "rows": rows}, args.output)  # atomic: a stopped run keeps its rows
    print(f"\n| task | left-out case | {' | '.join(models)} |\n|---|---|{'---|' * len(models)}")
    for task in dict.fromkeys(r["task"] for r in rows):
        for case in dict.fromkeys(r["case"] for r in rows if r["task"] == task):
            cells = [next(r for r in rows if r["task"] == task and r["case"] == case and r["model"] == m) for m in models]
            print(f"| {task} | {case} | " + " | ".join(f"{c['mean_dice']:.3f}" if c["mean_dice"] is not None else "-"
                                                       for c in cells) + " |")
    for m in models:
        scores = [r["mean_dice"] or 0.0 for r in rows if r["model"] == m]
        print(f"{m}: mean over {len(scores)} folds {statistics.fmean(scores):.3f}")


if __name__ == "__main__":
    main()
