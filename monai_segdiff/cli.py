"""``segdiff``: train / infer / evaluate / al-simulate / bench / export-bundle from the shell.

Every error the user can cause is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from . import al_simulation, click_bench, data, evaluation, selection
from .bench import main_bench
from .bundle import export_bundle
from .config import (
    ANCHORED_NETWORKS,
    INTENSITY_MODES,
    NETWORKS,
    PREDICTION_TYPES,
    UNCERTAINTY_KINDS,
    SegDiffConfig,
    load_checkpoint,
    parse_augment,
    parse_postprocess,
    training_state_path,
)
from .errors import CheckpointError, CLIError, DataError, InputError
from .io import is_picture, write_json, write_prediction
from .labelset import label_names
from .planning import new_config
from .retrain import RetrainOptions, plan, retrain
from .segmenter import Segmenter
from .tracking import TensorBoardCallback, run_dir
from .training import KEEP, LR_SCHEDULES, train
from .values import finite

# the library's defaults (one source): a new model's config, train()'s run options, the retraining policy
_CONFIG = SegDiffConfig()
_TRAIN = {k: p.default for k, p in inspect.signature(train).parameters.items()}
TRAIN_DEFAULTS: dict[str, Any] = {
    "network": _CONFIG.network, "epochs": None, "max_minutes": None, "batch_size": _TRAIN["batch_size"],
    "lr": _TRAIN["lr"], "lr_schedule": _TRAIN["lr_schedule"], "keep": _TRAIN["keep"],
    "val_split": RetrainOptions.val_split, "spatial_dims": _CONFIG.spatial_dims, "context": _CONFIG.context,
    "channels": None, "spacing": None, "roi_size": None, "prediction_type": _CONFIG.prediction_type,
    "steps": _CONFIG.sample_steps, "samples": _CONFIG.num_samples, "intensity": None, "seed": _TRAIN["seed"],
    "init": None, "resume": None, "iterations_per_epoch": None, "device": _TRAIN["device"], "use_raters": None,
    "anchor": None, "boundary_loss": None, "extra": None,
    "studies": None, "output": None, "postprocess": None, "tta_flips": None, "quiet": False, "tensorboard": None,
    "augment": None, "update": None, "click_channels": None,
}
# never taken over from the run that --resume continues (its other options are, unless given again)
RESUME_OWN = ("studies", "output", "resume", "init", "update", "quiet")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _postprocess(text: str) -> list[str]:
    try:
        return parse_postprocess(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _augment(text: str) -> list[str]:
    try:
        return parse_augment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segdiff", description="Diffusion segmentation with uncertainty on MONAI.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a studies folder")
    t.add_argument("--studies", help="MONAI Label studies folder (images, labels/final/); required here or in --config")
    t.add_argument("--output", help="checkpoint file to write (.pt), plus <output>.state for --resume; required")
    t.add_argument("--config", help="YAML file with any of these options, e.g. 'batch_size: 8' (the command line "
                   "overrides it)")
    t.add_argument("--network", choices=NETWORKS)
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-minutes", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="constant (the default) or cosine: the rate falls to 1%% of --lr by the end of the run "
                   "(--epochs or --max-minutes)")
    t.add_argument("--keep", choices=KEEP,
                   help="which epoch's weights --output gets: best (the default: best validation Dice) or last "
                   "(e.g. the end of a cosine decay)")
    t.add_argument("--val-split", type=float, help="share of labelled cases held out for validation")
    t.add_argument("--spatial-dims", type=int, choices=[2, 3])
    t.add_argument("--context", type=int, help="neighbouring slices per side (2.5D)")
    t.add_argument("--channels", type=_ints, help="e.g. 32,64,64")
    t.add_argument("--spacing", type=_floats, help="target spacing mm, e.g. 1.5,1.5,-1 (-1 keeps); default: auto")
    t.add_argument("--roi-size", type=_ints, help="training patch size, e.g. 96,96")
    t.add_argument("--prediction-type", choices=PREDICTION_TYPES)
    t.add_argument("--steps", type=int, help="default sampling steps stored in the model")
    t.add_argument("--samples", type=int, help="default ensemble size stored in the model")
    t.add_argument("--intensity", choices=INTENSITY_MODES,
                   help="percentile: robust range of each image; ct: one Hounsfield window from the labelled "
                        "voxels (default: ct when every image is CT in HU, else percentile)")
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=None,
                   help="medsegdiff, medsegdiff_v2: the anchor head (deterministic image-path prediction as "
                        "condition; on by default for a new model of either)")
    t.add_argument("--boundary-loss", action="store_true", default=None,
                   help="DermoSegDiff boundary-aware loss weights (on by default for dermosegdiff)")
    t.add_argument("--click-channels", action="store_true", default=None,
                   help="train a new model for correction with clicks: one guidance channel per class, "
                        "trained with simulated clicks on its own errors (DeepEdit's recipe)")
    t.add_argument("--init", help="checkpoint to fine-tune from")
    t.add_argument("--update", metavar="MODEL",
                   help="retrain MODEL as the app's Train does: fine-tune it when it fits the studies' labels, "
                        "images and spacing, else a new model for the studies' label set; write --output only "
                        "when its validation Dice beats MODEL's on the same cases")
    t.add_argument("--postprocess", type=_postprocess,
                   help="default clean-up of the model's masks: median,confident_component,largest_component,fill_holes")
    t.add_argument("--tta-flips", type=int, help=TTA_HELP + "; stored in the model (default 1)")
    t.add_argument("--augment", type=_augment,
                   help="training augmentations: flip,intensity,noise (the default: all) or 'none'")
    t.add_argument("--resume", help="checkpoint to continue exactly from its <checkpoint>.state (weights, EMA, "
                   "optimiser, step, config, options); --epochs / --max-minutes then count from there")
    t.add_argument("--device")
    t.add_argument("--quiet", action="store_true", default=None)
    t.add_argument("--tensorboard", metavar="DIR",
                   help="TensorBoard event files (loss, validation Dice, lr per epoch); "
                   "default <output folder>/runs/<name>-<time>; 'none' writes none")

    i = sub.add_parser("infer", help="segment one image with uncertainty")
    i.add_argument("--model", required=True)
    i.add_argument("--image", required=True, nargs="+",
                   help="image file (NIfTI, NRRD, PNG, JPG ...), or one file per channel in channel order")
    i.add_argument("--output", required=True, help="output folder")
    i.add_argument("--seg-nrrd", action="store_true",
                   help="also write <name>.seg.nrrd, a 3D Slicer segmentation with one named segment per label")
    i.add_argument("--nifti", action="store_true",
                   help="2D pictures: also write the mask and the uncertainty map as NIfTI (default: PNG only)")
    i.add_argument("--samples", type=int)
    i.add_argument("--steps", type=int)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--method", choices=["ddim", "ddpm"], default="ddim")
    i.add_argument("--uncertainty", choices=UNCERTAINTY_KINDS)
    i.add_argument("--postprocess", type=_postprocess,
                   help="clean-up of the fused mask: median,confident_component,largest_component,fill_holes or none "
                   "(default: the model's)")
    i.add_argument("--tta-flips", type=int, help=TTA_HELP + " (default: the model's)")
    i.add_argument("--device", default="cpu")
    i.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bench", help="performance comparisons (JSON with ratios, printed as a table)")
    b.add_argument("--model", required=True, nargs="+", help="checkpoint (--interactive: one or more side by side)")
    b.add_argument("--studies", default=str(Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"))
    b.add_argument("--samples", type=int, default=5)
    b.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 5 minutes)")
    b.add_argument("--output", help="JSON file to write")
    b.add_argument("--interactive", action="store_true",
                   help="the interaction benchmark: a simulated annotator clicks at the centre of the largest "
                        "error, one click at a time; Dice after 0/1/3/5/10 clicks, NoC@85/90, seconds per click")
    b.add_argument("--max-clicks", type=int, default=20, help="--interactive: clicks per case (NoC cap)")
    b.add_argument("--cases", type=int, help="--interactive: the first N labelled cases of --studies")
    b.add_argument("--no-follow", action="store_true",
                   help="--interactive: clicks hold only their neighbourhood (not the region the ensemble left open)")
    add_evaluate_parser(sub)
    add_al_parser(sub)
    x = sub.add_parser("export-bundle", help="write a MONAI Bundle that `python -m monai.bundle run` executes")
    x.add_argument("--model", required=True, help="checkpoint (.pt)")
    x.add_argument("--output", required=True, help="bundle folder to create (new or empty)")
    x.add_argument("--name", help="bundle name (default segdiff_<network>)")
    return p


def _train_actions() -> dict[str, argparse.Action]:
    """The ``train`` options by name (what a YAML config may set besides the YAML-only ones)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions if a.dest not in ("help", "config")}


def _yaml_value(name: str, value: Any, action: argparse.Action | None, path: Path) -> Any:
    """A YAML value converted as its command-line option would be (lists or comma strings)."""
    if value is None:
        return None
    if action is None:  # YAML-only: use_raters, extra
        kind = dict if name == "extra" else bool
        if not isinstance(value, kind):
            raise CLIError(f"{path}: {name} must be a {'mapping' if kind is dict else 'true/false'}, got {value!r}")
        return value
    if action.nargs == 0:  # flags
        if not isinstance(value, bool):
            raise CLIError(f"{path}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(value, (bool, dict)):
        raise CLIError(f"{path}: invalid {name} {value!r}")
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    try:
        out = action.type(text) if action.type else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise CLIError(f"{path}: invalid {name} {value!r} ({e})") from None
    if action.choices and out not in action.choices:
        raise CLIError(f"{path}: {name} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return out


def _yaml_options(path: Path) -> dict[str, Any]:
    """The options of a YAML config file; ``CLIError`` (one line) for anything unusable."""
    if not path.is_file():
        raise CLIError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold a mapping of option: value")
    names = {str(k): str(k).replace("-", "_") for k in data}
    unknown = [k for k, n in names.items() if n not in TRAIN_DEFAULTS]
    if unknown:
        hints = [k + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(names[k], TRAIN_DEFAULTS, 1))
                 for k in unknown]
        raise CLIError(f"{path}: unknown option(s) {', '.join(hints)}; see segdiff train --help")
    actions = _train_actions()
    return {names[str(k)]: _yaml_value(names[str(k)], v, actions.get(names[str(k)]), path)
            for k, v in data.items() if v is not None}


def _resumed_options(checkpoint: str) -> dict[str, Any]:
    """The options of the run that wrote ``checkpoint`` (stored in its ``.state`` file)."""
    state = training_state_path(checkpoint)
    if not Path(checkpoint).is_file():
        raise CLIError(f"checkpoint to resume not found: {checkpoint}")
    if not state.is_file():
        raise CLIError(f"no training state {state} to resume from (segdiff train writes it beside its --output); "
                       f"to fine-tune from the weights alone use --init {checkpoint}")
    return dict(load_checkpoint(state)[2].get("options") or {})


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < the resumed run's options < YAML config < command line."""
    given = _yaml_options(Path(args.config)) if args.config else {}
    given.update({k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k, None) is not None})
    opts = dict(TRAIN_DEFAULTS)
    if given.get("resume"):
        own = RESUME_OWN + (("epochs", "max_minutes") if {"epochs", "max_minutes"} & set(given) else ())
        opts.update({k: v for k, v in _resumed_options(given["resume"]).items() if k in opts and k not in own})
    opts.update(given)
    for key in ("studies", "output"):
        if not opts[key]:
            raise CLIError(f"--{key} is required (on the command line or in the --config file)")
    return opts


def cmd_train(args: argparse.Namespace) -> int:
    o = _train_options(args)
    if o["epochs"] is None and o["max_minutes"] is None:
        o["epochs"] = 10
    if o["epochs"] is not None and o["epochs"] < 1:
        raise CLIError(f"--epochs must be >= 1, got {o['epochs']}")
    items = data.labelled(data.datalist(o["studies"]))
    if not items:
        raise CLIError(f"no labelled image in {o['studies']} (labels go to labels/final/ with the image's name)")
    if o["update"]:
        return _train_update(o, items)
    train_items, val_items = data.split(items, o["val_split"] if len(items) > 1 else 0.0, seed=o["seed"])
    init_state = None
    if o["resume"]:
        cfg = load_checkpoint(o["resume"])[1]
    elif o["init"]:
        init_state, cfg, _ = load_checkpoint(o["init"])
        if (Path(o["studies"]) / "labels.json").is_file() and label_names(o["studies"], items) != cfg.labels:
            raise CLIError(f"--init {o['init']} has the labels {cfg.labels}, the studies' labels.json "
                           f"{label_names(o['studies'], items)}: train a new model (without --init) or fix labels.json")
    else:
        cfg = new_config(
            items, label_names(o["studies"], items), network=o["network"], spatial_dims=o["spatial_dims"],
            channels=o["channels"], spacing=o["spacing"], roi_size=o["roi_size"], context=o["context"],
            prediction_type=o["prediction_type"], sample_steps=o["steps"], num_samples=o["samples"],
            intensity=o["intensity"], postprocess=o["postprocess"] or [], extra=_extra(o),
            click_channels=bool(o["click_channels"]),
        )
    if o["augment"] is not None:  # also for --init / --resume: augmentation is a training choice
        cfg = cfg.replace(augment=o["augment"])
    if o["postprocess"] is not None:  # with --init too: the clean-up is an inference default
        cfg = cfg.replace(postprocess=o["postprocess"])
    if o["tta_flips"] is not None:  # an inference default, as the clean-up
        cfg = cfg.replace(tta_flips=o["tta_flips"])
    if not o["quiet"]:
        print(f"training {cfg.network} on {len(train_items)} cases (validation {len(val_items)}), "
              f"labels {cfg.labels}, spacing {cfg.spacing}", file=sys.stderr)
    writer = _tensorboard(o)
    try:
        result = train(
            cfg, train_items, val_items, output=o["output"], epochs=o["epochs"], max_minutes=o["max_minutes"],
            batch_size=o["batch_size"], lr=o["lr"], lr_schedule=o["lr_schedule"], keep=o["keep"],
            iterations_per_epoch=o["iterations_per_epoch"], init_state=init_state, seed=o["seed"],
            device=o["device"], progress=not o["quiet"],
            resume=o["resume"], use_raters=o["use_raters"], save_state=True, options=o, callback=writer,
        )
    finally:
        if writer is not None:
            writer.close()
    print(json.dumps(result.__dict__, indent=2))
    return 0


def _train_update(o: dict[str, Any], items: list[dict]) -> int:
    """``segdiff train --update MODEL``: the library's retraining policy (``retrain``), as the app's train
    task runs it; prints what it did (start, baseline, best Dice, published or why not)."""
    if o["init"] or o["resume"]:
        raise CLIError("--update chooses its own start: do not combine it with --init or --resume")
    options = RetrainOptions(epochs=o["epochs"], max_minutes=o["max_minutes"], val_split=o["val_split"],
                             batch_size=o["batch_size"], lr=o["lr"], iterations_per_epoch=o["iterations_per_epoch"],
                             network=o["network"], seed=o["seed"])
    run = plan(items, label_names(o["studies"], items), o["update"], options, o["device"])
    if not o["quiet"]:
        how = "fine-tuning" if run.start.init == "pretrained" else f"a new model ({run.start.reason})"
        print(f"{how}: {run.start.config.network} on {len(run.train_items)} cases (validation "
              f"{len(run.val_items)}), labels {run.start.config.labels}", file=sys.stderr)
    results, publisher = retrain(run, o["output"], options, o["device"], progress=not o["quiet"])
    print(json.dumps(finite({"init": run.start.init, "reason": run.start.reason, "baseline_dice": run.baseline,
                      "best_dice": results[0].best_dice, "epochs": results[0].epochs, "published": publisher.published,
                      "output": str(o["output"]), "kept": str(publisher.kept) if publisher.kept else None,
                      "note": publisher.note(results[0].best_dice, bool(run.val_items))}), indent=2))
    return 0


def _tensorboard(o: dict[str, Any]):
    """The TensorBoard writer of a ``train`` run (None for ``--tensorboard none``); its folder is kept in
    the options, so ``--resume`` continues the same curves."""
    if isinstance(o.get("tensorboard"), str) and o["tensorboard"].strip().lower() == "none":
        return None
    if not o.get("tensorboard"):
        o["tensorboard"] = str(run_dir(Path(o["output"]).parent / "runs", Path(o["output"]).stem))
    if not o["quiet"]:
        print(f"TensorBoard: tensorboard --logdir {o['tensorboard']}", file=sys.stderr)
    return TensorBoardCallback(o["tensorboard"])


def _extra(o: dict[str, Any]) -> dict[str, Any]:
    """Network-specific settings (``extra`` mapping of the YAML config, plus the flags)."""
    extra = dict(o.get("extra") or {})
    if o.get("anchor") is not None:  # the anchor head of the chosen network (medsegdiff's otherwise)
        network = o.get("network") if o.get("network") in ANCHORED_NETWORKS else "medsegdiff"
        extra.setdefault(network, {})["anchor"] = bool(o["anchor"])
    if o.get("boundary_loss") is not None:
        extra["boundary_loss"] = bool(o["boundary_loss"])
    return extra


# ------------------------------------------------------------------------------------- evaluate
TTA_HELP = "test-time mirror views averaged into each ensemble member: 1 none, up to 4 in 2D, 8 in 3D"


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    """Add ``segdiff evaluate`` to the ``segdiff`` sub-parsers."""
    e = sub.add_parser("evaluate", help="Dice/HD95, uncertainty AUROC/ECE, GED/CI of a model on labelled studies")
    e.add_argument("--model", required=True, help="checkpoint (.pt)")
    e.add_argument("--studies", required=True, help="studies folder with labels/final/ (and rater tags)")
    e.add_argument("--report", required=True, help="output folder for report.json, report.html and PNGs")
    e.add_argument("--samples", type=int, help="ensemble size (default: the model's)")
    e.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--uncertainty", choices=UNCERTAINTY_KINDS)
    e.add_argument("--subset", choices=["all", "val"], default="all",
                   help="'val': only the validation cases of segdiff train's split (same --val-split/--split-seed)")
    e.add_argument("--val-split", type=float, default=0.2)
    e.add_argument("--split-seed", type=int, default=0)
    e.add_argument("--postprocess",
                   help="clean-up of the fused mask instead of the model's stored one, e.g. "
                   "median,confident_component,fill_holes, or none")
    e.add_argument("--tta-flips", type=int, help=TTA_HELP + " (default: the model's)")
    e.add_argument("--cases", help="comma-separated case ids to evaluate")
    e.add_argument("--max-cases", type=int)
    e.add_argument("--no-pictures", action="store_true")
    e.add_argument("--device", default="cpu")
    e.add_argument("--quiet", action="store_true")
    return e


def cmd_evaluate(args: argparse.Namespace) -> int:
    report = evaluation.evaluate_checkpoint(
        args.model, args.studies, args.report, samples=args.samples, steps=args.steps, seed=args.seed,
        device=args.device, uncertainty=args.uncertainty, subset=args.subset, val_split=args.val_split,
        split_seed=args.split_seed, cases=[c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None,
        max_cases=args.max_cases, progress=not args.quiet, pictures=not args.no_pictures,
        postprocess=args.postprocess, tta_flips=args.tta_flips,
    )
    if not args.quiet:
        print(evaluation.summary_text(report))
    print(f"report: {Path(args.report) / 'report.html'}", file=sys.stderr)
    return 0



# ---------------------------------------------------------------------------------- al-simulate
def _seeds(text: str) -> list[int]:
    """Seeds from ``0,1,2`` or the range ``0-2``."""
    if "-" in text.strip()[1:]:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return _ints(text)


def add_al_parser(sub) -> argparse.ArgumentParser:
    """Add ``segdiff al-simulate`` to the ``segdiff`` sub-parsers."""
    a = sub.add_parser("al-simulate", help="simulate active learning on a labelled studies folder")
    a.add_argument("--studies", required=True, help="studies folder where every case is labelled")
    a.add_argument("--report", required=True, help="output folder (curves.json, curves.png, summary.json); the "
                   "same command on the same folder resumes an interrupted run")
    a.add_argument("--strategies", help=f"comma-separated, of {', '.join(al_simulation.STRATEGIES)} (default: all; "
                   f"with --unit slices all of {', '.join(al_simulation.SLICE_STRATEGIES)})")
    a.add_argument("--fg-share", type=float, default=selection.FG_SHARE,
                   help="fg_random: share of picks drawn among cases containing foreground")
    a.add_argument("--unit", choices=al_simulation.UNITS, default="cases",
                   help="what is annotated: whole cases, or slices of each picked case (partial annotation; "
                   f"strategies {', '.join(al_simulation.SLICE_STRATEGIES)})")
    a.add_argument("--slices-per-case", type=int, default=4, help="--unit slices: annotated slices per picked case")
    a.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-2")
    a.add_argument("--initial", type=int, default=2, help="labelled cases at the start")
    a.add_argument("--per-round", type=int, default=1, help="cases labelled per round")
    a.add_argument("--rounds", type=int, default=5)
    a.add_argument("--test-fraction", type=float, default=0.25)
    a.add_argument("--network", choices=[n for n in NETWORKS if n != "unet"], default="medsegdiff")
    a.add_argument("--channels", type=_ints)
    a.add_argument("--spacing", type=_floats)
    a.add_argument("--roi-size", type=_ints)
    a.add_argument("--epochs", type=int, help="training epochs per round (default 2)")
    a.add_argument("--initial-epochs", type=int, help="epochs of round 0 (from scratch)")
    a.add_argument("--iterations-per-epoch", type=int, default=20)
    a.add_argument("--max-minutes", type=float, help="training minutes per round (instead of, or capping, epochs)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--samples", type=int, default=3, help="ensemble size for scoring and testing")
    a.add_argument("--steps", type=int, default=2, help="sampling steps for scoring and testing")
    a.add_argument("--mc-samples", type=int, default=5)
    a.add_argument("--mc-channels", type=_ints, default=[16, 32, 64, 128])
    a.add_argument("--uncertainty", choices=UNCERTAINTY_KINDS,
                   help="voxel map the scorers rank by (default: the model's)")
    a.add_argument("--acquisition", choices=al_simulation.ACQUISITIONS, default="top",
                   help="scored strategies: take the top scores (as the app does) or draw with P ~ score^beta")
    a.add_argument("--power-beta", type=float, default=1.0, help="beta of --acquisition power")
    a.add_argument("--device", default="cpu")
    a.add_argument("--quiet", action="store_true")
    return a


def cmd_al_simulate(args: argparse.Namespace) -> int:
    epochs = args.epochs if args.epochs is not None else (None if args.max_minutes is not None else 2)
    default = al_simulation.SLICE_STRATEGIES if args.unit == "slices" else al_simulation.STRATEGIES
    settings = al_simulation.SimulationSettings(
        strategies=(args.strategies or ",".join(default)).split(","), seeds=_seeds(args.seeds), initial=args.initial,
        per_round=args.per_round, rounds=args.rounds, test_fraction=args.test_fraction, network=args.network,
        channels=args.channels, spacing=args.spacing, roi_size=args.roi_size, epochs=epochs,
        iterations_per_epoch=args.iterations_per_epoch, max_minutes=args.max_minutes,
        initial_epochs=args.initial_epochs, batch_size=args.batch_size, lr=args.lr, samples=args.samples,
        steps=args.steps, mc_samples=args.mc_samples, mc_channels=args.mc_channels, device=args.device,
        uncertainty=args.uncertainty, acquisition=args.acquisition, power_beta=args.power_beta,
        fg_share=args.fg_share, unit=args.unit, slices_per_case=args.slices_per_case,
    )
    log, bar = None, None
    if not args.quiet:  # one line per round above a bar over all rounds (each training keeps quiet)
        bar = tqdm(total=len(settings.seeds) * (1 + len(settings.strategies) * settings.rounds), desc="al-simulate",
                   unit="round")
        log = lambda msg: (bar.write(msg, file=sys.stderr), bar.update(1))  # noqa: E731
    try:
        result = al_simulation.simulate(args.studies, settings, args.report, progress=False, log=log)
    finally:
        if bar is not None:
            bar.close()
    print(al_simulation.summary_text(result))
    return 0



def cmd_infer(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    seg = Segmenter.from_checkpoint(
        args.model, num_samples=args.samples, steps=args.steps, seed=args.seed, method=args.method,
        device=args.device, progress=not args.quiet, uncertainty=args.uncertainty, postprocess=args.postprocess,
        tta_flips=args.tta_flips,
    )
    image = args.image[0] if len(args.image) == 1 else args.image  # several files: one per channel
    pred = seg(image)
    out = Path(args.output)
    name = data.case_id(image)
    files = write_prediction(pred.label, pred.uncertainty, out, name, picture=is_picture(args.image[0]), nifti=args.nifti,
                             seg_nrrd=seg.cfg.label_names if args.seg_nrrd else None)
    stats = dict(pred.stats, image=image, model=str(args.model), outputs={k: f.name for k, f in files.items()})
    stats["timings"]["wall_s"] = time.perf_counter() - t0
    write_json(stats, out / f"{name}.json")
    if not args.quiet:
        print(json.dumps({k: stats[k] for k in ("labels", "case_score", "timings")}, indent=2))
    return 0


def cmd_export_bundle(args: argparse.Namespace) -> int:
    out = export_bundle(args.model, args.output, name=args.name)
    print(f"MONAI Bundle written to {out}; run it with:\n  python -m monai.bundle run --config_file "
          f"{out}/configs/inference.json --meta_file {out}/configs/metadata.json --bundle_root {out} "
          f"--dataset_dir IMAGES --output_dir OUT")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.interactive:
        if len(args.model) != 1:
            raise CLIError("bench takes one --model (several only with --interactive)")
        args.model = args.model[0]
        return main_bench(args)
    if args.max_clicks < 1:
        raise CLIError(f"--max-clicks must be >= 1, got {args.max_clicks}")
    cases = data.labelled(data.datalist(args.studies))[: args.cases]
    if not cases:
        raise CLIError(f"no labelled case in {args.studies}")
    result = click_bench.run(args.model, cases, max_clicks=args.max_clicks, num_samples=args.samples,
                             follow=not args.no_follow)
    if args.output:
        write_json(result, Path(args.output))
    print("| model | Dice @ " + " / ".join(map(str, click_bench.REPORT_AT)) + " clicks | NoC@85 | NoC@90 "
          "| plain s | s per click |\n|---|---|---|---|---|---|")
    for model, r in result.items():
        at = " / ".join(f"{v:.3f}" for v in r["dice_at"].values())
        print(f"| {Path(model).name} ({r['network']}{', clicks' if r['click_channels'] else ''}) | {at} "
              f"| {r['noc85']:.1f} | {r['noc90']:.1f} | {r['plain_s']:.1f} | {r['click_s']:.1f} |")
    return 0


COMMANDS = {
    "train": cmd_train, "infer": cmd_infer, "bench": cmd_bench, "evaluate": cmd_evaluate, "al-simulate": cmd_al_simulate,
    "export-bundle": cmd_export_bundle,
}


def main(argv: Sequence[str] | None = None) -> int:
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
