"""``segdiff``: train / infer / evaluate / al-simulate / bench / export-bundle from the shell.

Every error the user can cause is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .al_simulation import add_al_parser, cmd_al_simulate
from .evaluation import add_evaluate_parser, cmd_evaluate

TRAIN_DEFAULTS: dict[str, Any] = {
    "network": "medsegdiff", "epochs": None, "max_minutes": None, "batch_size": 16, "lr": 1e-3, "val_split": 0.2,
    "spatial_dims": 2, "context": 1, "channels": None, "spacing": None, "roi_size": None,
    "prediction_type": "sample", "steps": 4, "samples": 5, "intensity": "percentile", "seed": 0,
    "init": None, "resume": None, "iterations_per_epoch": None, "device": "cpu", "use_raters": None,
    "anchor": False, "boundary_loss": None, "extra": None,
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segdiff", description="Diffusion segmentation with uncertainty on MONAI.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a studies folder")
    t.add_argument("--studies", required=True, help="MONAI Label studies folder (images, labels/final/)")
    t.add_argument("--output", required=True, help="checkpoint file to write (.pt)")
    t.add_argument("--config", help="YAML file with any of these options (command line overrides it)")
    t.add_argument("--network", choices=["concat", "medsegdiff", "dermosegdiff", "cimd", "unet"])
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-minutes", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--val-split", type=float, help="share of labelled cases held out for validation")
    t.add_argument("--spatial-dims", type=int, choices=[2, 3])
    t.add_argument("--context", type=int, help="neighbouring slices per side (2.5D)")
    t.add_argument("--channels", type=_ints, help="e.g. 32,64,64")
    t.add_argument("--spacing", type=_floats, help="target spacing mm, e.g. 1.5,1.5,-1 (-1 keeps); default: auto")
    t.add_argument("--roi-size", type=_ints, help="training patch size, e.g. 96,96")
    t.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"])
    t.add_argument("--steps", type=int, help="default sampling steps stored in the model")
    t.add_argument("--samples", type=int, help="default ensemble size stored in the model")
    t.add_argument("--intensity", choices=["percentile", "ct"])
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--anchor", action="store_true", default=None,
                   help="medsegdiff: add the anchor head (deterministic image-path prediction as condition)")
    t.add_argument("--boundary-loss", action="store_true", default=None,
                   help="DermoSegDiff boundary-aware loss weights (on by default for dermosegdiff)")
    t.add_argument("--init", help="checkpoint to fine-tune from")
    t.add_argument("--resume", help="checkpoint to continue (weights, optimiser, step, config)")
    t.add_argument("--device")
    t.add_argument("--quiet", action="store_true")

    i = sub.add_parser("infer", help="segment one image with uncertainty")
    i.add_argument("--model", required=True)
    i.add_argument("--image", required=True)
    i.add_argument("--output", required=True, help="output folder")
    i.add_argument("--samples", type=int)
    i.add_argument("--steps", type=int)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--method", choices=["ddim", "ddpm"], default="ddim")
    i.add_argument("--uncertainty", choices=["entropy", "mutual_information", "variance", "disagreement"])
    i.add_argument("--device", default="cpu")
    i.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bench", help="performance comparisons (JSON with ratios, printed as a table)")
    b.add_argument("--model", required=True)
    b.add_argument("--studies", default=str(Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"))
    b.add_argument("--samples", type=int, default=5)
    b.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 5 minutes)")
    b.add_argument("--output", help="JSON file to write")
    add_evaluate_parser(sub)
    add_al_parser(sub)
    return p


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(TRAIN_DEFAULTS)
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise CLIError(f"{path} must hold a mapping of option: value")
        unknown = sorted(set(k.replace("-", "_") for k in data) - set(opts))
        if unknown:
            raise CLIError(f"{path}: unknown option(s) {', '.join(unknown)}")
        opts.update({k.replace("-", "_"): v for k, v in data.items()})
    for key in opts:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


def cmd_train(args: argparse.Namespace) -> int:
    from . import data
    from .config import load_checkpoint
    from .labelset import label_names
    from .training import new_config, train

    o = _train_options(args)
    if o["epochs"] is None and o["max_minutes"] is None:
        o["epochs"] = 10
    if o["epochs"] is not None and o["epochs"] < 1:
        raise CLIError(f"--epochs must be >= 1, got {o['epochs']}")
    items = data.labelled(data.datalist(args.studies))
    if not items:
        raise CLIError(f"no labelled image in {args.studies} (labels go to labels/final/ with the image's name)")
    train_items, val_items = data.split(items, o["val_split"] if len(items) > 1 else 0.0, seed=o["seed"])
    init_state = None
    if o["resume"]:
        cfg = load_checkpoint(o["resume"])[1]
    elif o["init"]:
        init_state, cfg, _ = load_checkpoint(o["init"])
    else:
        cfg = new_config(
            items, label_names(args.studies, items), network=o["network"], spatial_dims=o["spatial_dims"],
            channels=o["channels"], spacing=o["spacing"], roi_size=o["roi_size"], context=o["context"],
            prediction_type=o["prediction_type"], sample_steps=o["steps"], num_samples=o["samples"],
            intensity=o["intensity"], extra=_extra(o),
        )
    if not args.quiet:
        print(f"training {cfg.network} on {len(train_items)} cases (validation {len(val_items)}), "
              f"labels {cfg.labels}, spacing {cfg.spacing}", file=sys.stderr)
    result = train(
        cfg, train_items, val_items, output=args.output, epochs=o["epochs"], max_minutes=o["max_minutes"],
        batch_size=o["batch_size"], lr=o["lr"], iterations_per_epoch=o["iterations_per_epoch"],
        init_state=init_state, seed=o["seed"], device=o["device"], progress=not args.quiet,
        resume=o["resume"], use_raters=o["use_raters"],
    )
    print(json.dumps(result.__dict__, indent=2))
    return 0


def _extra(o: dict[str, Any]) -> dict[str, Any]:
    """Network-specific settings (``extra`` mapping of the YAML config, plus the flags)."""
    extra = dict(o.get("extra") or {})
    if o.get("anchor"):
        extra.setdefault("medsegdiff", {})["anchor"] = True
    if o.get("boundary_loss") is not None:
        extra["boundary_loss"] = bool(o["boundary_loss"])
    return extra


def cmd_infer(args: argparse.Namespace) -> int:
    from .data import image_id
    from .io import write_json, write_nifti
    from .segmenter import Segmenter

    t0 = time.perf_counter()
    seg = Segmenter.from_checkpoint(
        args.model, num_samples=args.samples, steps=args.steps, seed=args.seed, method=args.method,
        device=args.device, progress=not args.quiet, uncertainty=args.uncertainty,
    )
    pred = seg(args.image)
    out = Path(args.output)
    name = image_id(args.image)
    write_nifti(pred.label, pred.label.affine, out / f"{name}_seg.nii.gz")
    write_nifti(pred.uncertainty, pred.uncertainty.affine, out / f"{name}_uncertainty.nii.gz")
    stats = dict(pred.stats, image=str(args.image), model=str(args.model))
    stats["timings"]["wall_s"] = time.perf_counter() - t0
    write_json(stats, out / f"{name}.json")
    if not args.quiet:
        print(json.dumps({k: stats[k] for k in ("labels", "case_score", "timings")}, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(args)


COMMANDS = {
    "train": cmd_train, "infer": cmd_infer, "bench": cmd_bench, "evaluate": cmd_evaluate, "al-simulate": cmd_al_simulate,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .config import CheckpointError
    from .data import DataError
    from .transforms import InputError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, CheckpointError, InputError, DataError, ValueError, FileNotFoundError) as e:
        print(f"segdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
