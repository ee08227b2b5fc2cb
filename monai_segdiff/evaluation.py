"""``segdiff evaluate``: how good is a model, and how much can its uncertainty be trusted?

For every labelled case of a studies folder the checkpoint's :class:`~monai_segdiff.segmenter.Segmenter`
(the same inference path as ``segdiff infer`` and the MONAI Label app) produces a label map, an
uncertainty map and an ensemble. Measured per case, then summarised:

* **Dice and HD95** per foreground label (``monai.metrics`` through :mod:`monai_segdiff.metrics`) on the
  *input grid*, the grid of the user's image and label files; HD95 in mm.
* **Uncertainty-error AUROC** on the input grid: how well the voxel uncertainty map separates wrong
  voxels (prediction != truth) from right ones. Reported over all voxels and over the *foreground
  region* (truth or prediction foreground), which excludes the easy far background. The pooled value
  over all cases comes from per-bin counts (1000 bins of uncertainty in [0, 1]; voxels in one bin count
  as ties), so no case's voxels are kept in memory.
* **Expected calibration error** and the reliability diagram of the ensemble's mean class
  probabilities. These live on the *preprocessed grid* (RAS, resampled to the model's spacing), where
  the ensemble ran: the ground truth is brought there with the model's own preprocessing transforms
  (nearest neighbour) instead of interpolating probabilities back, so the probabilities judged are
  exactly the ones the model produced. When the two grids coincide (same shape and affine) the truth is
  used as is.
* **GED and CI score** (ensemble samples vs. annotators) when the folder has rater tags
  (``labels/rater1/`` ...), on the preprocessed grid like the samples.
* **Case score vs case Dice**: the Spearman rank correlation between the case uncertainty score that
  active learning ranks by and the case's mean Dice (negative = uncertain cases are the bad ones).
* **Timings** of the segmenter per case.

Outputs in the report folder: ``report.json`` (strict JSON, undefined values are ``null``),
``report.html`` and PNG pictures (best and worst case slices, reliability diagram, uncertainty vs error,
case score vs Dice).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import data, metrics
from . import report as rep
from . import uncertainty as unc
from .config import SegDiffConfig
from .errors import InputError
from .io import load_image, load_label, write_json
from .segmenter import Prediction, Segmenter
from .transforms import apply, preprocess_transforms
from .values import finite

__all__ = ["AUROC_BINS", "ECE_BINS", "Evaluator", "evaluate", "evaluate_checkpoint", "summary_text"]

AUROC_BINS = 1000  # pooled AUROC resolution (uncertainty in [0, 1])
PLOT_BINS = 20  # bins of the uncertainty-vs-error picture (AUROC_BINS must be a multiple)
ECE_BINS = 10


def _as_label(x: torch.Tensor) -> torch.Tensor:
    """``[1, *spatial]`` or ``[*spatial]`` label image -> int64 ``[*spatial]``."""
    t = torch.as_tensor(x)
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    if t.ndim >= 3 and t.shape[0] == 1:
        t = t[0]
    return t.round().long()


def _spacing(img: Any) -> list[float] | None:
    try:
        return [float(s) for s in img.pixdim]
    except (AttributeError, TypeError, ValueError):
        return None


def _same_grid(a: Any, b: Any) -> bool:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return False
    try:
        return bool(torch.allclose(torch.as_tensor(a.affine).double(), torch.as_tensor(b.affine).double(), atol=1e-4))
    except AttributeError:
        return True


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else math.nan


class _Pooled:
    """Per-bin counts accumulated over cases: uncertainty vs error and confidence vs accuracy."""

    def __init__(self) -> None:
        self.errors = np.zeros(AUROC_BINS)
        self.correct = np.zeros(AUROC_BINS)
        self.errors_fg = np.zeros(AUROC_BINS)
        self.correct_fg = np.zeros(AUROC_BINS)
        self.ece = {k: {"count": np.zeros(ECE_BINS), "conf": np.zeros(ECE_BINS), "acc": np.zeros(ECE_BINS)}
                    for k in ("all", "foreground")}
        self.by_map: dict[str, list] = {}  # uncertainty kind -> [errors, correct] histograms (working grid)

    @staticmethod
    def _hist(u: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        idx = (u.clamp(0.0, 1.0) * AUROC_BINS).long().clamp_(max=AUROC_BINS - 1)
        err = torch.bincount(idx[mask], minlength=AUROC_BINS).double().numpy()
        ok = torch.bincount(idx[~mask], minlength=AUROC_BINS).double().numpy()
        return err, ok

    def add_uncertainty(self, u: torch.Tensor, error: torch.Tensor, region: torch.Tensor) -> None:
        err, ok = self._hist(u.reshape(-1).float(), error.reshape(-1))
        self.errors += err
        self.correct += ok
        err, ok = self._hist(u[region].float(), error[region])
        self.errors_fg += err
        self.correct_fg += ok

    def add_maps(self, maps: dict, error: torch.Tensor) -> None:
        for kind, m in maps.items():
            err, ok = self._hist(m.reshape(-1).float(), error.reshape(-1))
            acc = self.by_map.setdefault(kind, [np.zeros(AUROC_BINS), np.zeros(AUROC_BINS)])
            acc[0] += err
            acc[1] += ok

    def add_diagram(self, key: str, diagram: dict) -> None:
        acc = self.ece[key]
        count = np.asarray(diagram["count"], dtype=np.float64)
        acc["count"] += count
        acc["conf"] += count * np.asarray([c or 0.0 for c in diagram["confidence"]])
        acc["acc"] += count * np.asarray([a or 0.0 for a in diagram["accuracy"]])

    def diagram(self, key: str) -> tuple[float, dict]:
        a = self.ece[key]
        count, total = a["count"], a["count"].sum()
        nonempty = count > 0
        conf = np.divide(a["conf"], count, out=np.zeros(ECE_BINS), where=nonempty)
        accuracy = np.divide(a["acc"], count, out=np.zeros(ECE_BINS), where=nonempty)
        ece = float(((count / total) * np.abs(accuracy - conf)).sum()) if total > 0 else math.nan
        edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
        return ece, {
            "bin_edges": [float(e) for e in edges],
            "confidence": [float(c) if n else None for c, n in zip(conf, nonempty)],
            "accuracy": [float(x) if n else None for x, n in zip(accuracy, nonempty)],
            "count": [int(n) for n in count],
        }

    def coarse(self) -> dict:
        g = AUROC_BINS // PLOT_BINS
        return {
            "bin_edges": [float(e) for e in np.linspace(0.0, 1.0, PLOT_BINS + 1)],
            "errors": [int(v) for v in self.errors.reshape(PLOT_BINS, g).sum(1)],
            "correct": [int(v) for v in self.correct.reshape(PLOT_BINS, g).sum(1)],
        }


class Evaluator:
    """Evaluate a segmenter on labelled datalist items.

    Args:
        segmenter: callable ``image path -> Prediction`` with a ``cfg`` attribute (a
            :class:`~monai_segdiff.segmenter.Segmenter`).
        progress: progress bar over the cases.
    """

    def __init__(self, segmenter: Callable[[str], Prediction], progress: bool = False) -> None:
        self.segmenter = segmenter
        self.cfg: SegDiffConfig = segmenter.cfg
        self.progress = progress

    # -- one case -------------------------------------------------------------------------------
    def working_labels(self, item: dict, pred: Prediction, truth_input: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Truth and rater labels on the grid of ``pred.ensemble`` (the preprocessed grid)."""
        grid = tuple(pred.ensemble.probs.shape[1:])
        raters = list(item.get("raters", []))
        if truth_input.ndim - 1 == 2 or _same_grid(pred.preprocessed, truth_input):
            truth = _as_label(truth_input)
            refs = [_as_label(load_label(r, self.cfg.label_names)) for r in raters]
        else:
            keys = ["label"] + [f"rater{i}" for i in range(len(raters))]
            d = {"image": item["image"], "label": item["label"], **{f"rater{i}": r for i, r in enumerate(raters)}}
            out = apply(preprocess_transforms(self.cfg, label_keys=keys), d)
            truth = _as_label(out["label"])
            refs = [_as_label(out[k]) for k in keys[1:]]
        if truth.numel() != math.prod(grid):
            raise InputError(f"{item['id']}: label grid {tuple(truth.shape)} does not match the ensemble grid {grid}")
        return truth.reshape(grid), [r.reshape(grid) for r in refs]

    def case(self, item: dict) -> tuple[dict, dict]:
        """Metrics of one labelled item, and the pieces the report pools (histograms, slices)."""
        cfg, k = self.cfg, self.cfg.num_classes
        pred = self.segmenter(item["image"])
        t0 = time.perf_counter()
        truth_img = load_label(item["label"], cfg.label_names)
        if tuple(truth_img.shape[1:]) != tuple(pred.label.shape[1:]):
            raise InputError(f"{item['id']}: label shape {tuple(truth_img.shape[1:])} does not match image shape "
                             f"{tuple(pred.label.shape[1:])}")
        truth = _as_label(truth_img)
        label = _as_label(pred.label)
        if int(truth.max()) >= k or int(truth.min()) < 0:
            raise InputError(f"{item['id']}: label values outside 0..{k - 1}")
        names = list(cfg.labels)
        dice = metrics.dice_per_label(label, truth, k)
        hd95 = metrics.hd95_per_label(label, truth, k, spacing=_spacing(pred.label))
        u = _as_tensor(pred.uncertainty).float().reshape(truth.shape)
        error = label != truth
        region = (truth > 0) | (label > 0)
        auroc = metrics.uncertainty_auroc(u, error)
        auroc_fg = metrics.uncertainty_auroc(u[region], error[region]) if bool(region.any()) else math.nan

        probs = pred.ensemble.probs.float()
        truth_w, raters_w = self.working_labels(item, pred, truth_img)
        ece, diagram = metrics.expected_calibration_error(probs, truth_w, ECE_BINS)
        region_w = (truth_w > 0) | (probs.argmax(0) > 0)
        if bool(region_w.any()):
            ece_fg, diagram_fg = metrics.expected_calibration_error(probs[:, region_w], truth_w[region_w], ECE_BINS)
        else:
            ece_fg, diagram_fg = math.nan, None
        record: dict[str, Any] = {
            "id": item["id"],
            "image": item["image"],
            "dice": dict(zip(names, dice)),
            "hd95": dict(zip(names, hd95)),
            "mean_dice": _nanmean(dice),
            "auroc": auroc,
            "auroc_foreground": auroc_fg,
            "error_voxels": int(error.sum()),
            "voxels": int(error.numel()),
            "ece": ece,
            "ece_foreground": ece_fg,
            "ged": None,
            "ci": None,
            "ci_components": None,
            "raters": len(raters_w),
            "case_score": float(pred.stats.get("case_score", math.nan)),
            "volumes": pred.stats.get("labels"),
        }
        # every voxel map the library offers, on the working grid, as a detector of the fused
        # prediction's errors; and the case score each would give (which one ranks cases best?)
        samples_w = pred.ensemble.samples.reshape(-1, *truth_w.shape)
        ee = pred.ensemble.expected_entropy
        ee = ee.reshape(truth_w.shape) if ee is not None else None
        fused_w = unc.fuse(probs, samples_w, method=cfg.fusion, num_classes=k)
        error_w = fused_w != truth_w
        maps = {}
        for kind in unc.UNCERTAINTY_KINDS:
            try:
                maps[kind] = unc.uncertainty_map(kind, probs, samples_w, ee)
            except ValueError:  # e.g. no expected entropy for mutual information
                continue
        record["auroc_by_uncertainty"] = {kind: metrics.uncertainty_auroc(m, error_w) for kind, m in maps.items()}
        record["case_score_by_uncertainty"] = {kind: unc.case_score(m, probs, samples_w) for kind, m in maps.items()}
        if raters_w:
            samples = [s.long() for s in samples_w]
            record["ged"] = metrics.ged(samples, raters_w, num_classes=k)
            ci = metrics.ci_score(samples, raters_w, num_classes=k)
            record["ci"], record["ci_components"] = ci["ci"], {n: v for n, v in ci.items() if n != "ci"}
        timings = dict(pred.stats.get("timings", {}))
        timings["metrics_s"] = time.perf_counter() - t0
        record["timings"] = timings
        pooled = {"u": u, "error": error, "region": region, "diagram": diagram, "diagram_fg": diagram_fg,
                  "truth": truth, "label": label, "maps": maps, "error_w": error_w}
        return record, pooled

    # -- all cases ------------------------------------------------------------------------------
    def run(self, items: Sequence[dict], report_dir: str | Path | None = None, meta: dict | None = None,
            pictures: bool = True) -> dict:
        """Evaluate ``items`` (each with ``label``), write the report when ``report_dir`` is given,
        return the report dict (JSON-safe)."""
        items = [it for it in items if it.get("label")]
        if not items:
            raise InputError("no labelled case to evaluate (labels go to labels/final/ with the image's name)")
        t_start = time.perf_counter()
        pooled = _Pooled()
        cases: list[dict] = []
        best = worst = None  # (mean dice, picture data)
        it = items
        if self.progress:
            it = tqdm(items, desc="evaluate", unit="case")
        for item in it:
            record, p = self.case(item)
            cases.append(record)
            pooled.add_uncertainty(p["u"], p["error"], p["region"])
            pooled.add_maps(p["maps"], p["error_w"])
            pooled.add_diagram("all", p["diagram"])
            if p["diagram_fg"] is not None:
                pooled.add_diagram("foreground", p["diagram_fg"])
            score = record["mean_dice"] if math.isfinite(record["mean_dice"]) else -1.0
            if pictures and report_dir is not None:
                if best is None or score > best[0]:
                    best = (score, self._slice(item, p, record, "fg"))
                if worst is None or score < worst[0]:
                    worst = (score, self._slice(item, p, record, "error"))
        wall = time.perf_counter() - t_start
        names = list(self.cfg.labels)
        ece_all, diagram_all = pooled.diagram("all")
        ece_fg, diagram_fg = pooled.diagram("foreground")
        timing_keys = sorted({k for c in cases for k in c["timings"]})
        summary = {
            "cases": len(cases),
            "dice": {n: metrics.summarise([c["dice"][n] for c in cases]) for n in names},
            "mean_dice": metrics.summarise([c["mean_dice"] for c in cases]),
            "hd95": {n: metrics.summarise([c["hd95"][n] for c in cases]) for n in names},
            "auroc": {"pooled": metrics.binned_auroc(pooled.errors, pooled.correct),
                      **metrics.summarise([c["auroc"] for c in cases])},
            "auroc_foreground": {"pooled": metrics.binned_auroc(pooled.errors_fg, pooled.correct_fg),
                                 **metrics.summarise([c["auroc_foreground"] for c in cases])},
            "ece": {"pooled": ece_all, **metrics.summarise([c["ece"] for c in cases])},
            "ece_foreground": {"pooled": ece_fg, **metrics.summarise([c["ece_foreground"] for c in cases])},
            "ged": metrics.summarise([c["ged"] for c in cases if c["ged"] is not None]),
            "ci": metrics.summarise([c["ci"] for c in cases if c["ci"] is not None]),
            "spearman_case_score_vs_dice": metrics.spearman([c["case_score"] for c in cases],
                                                        [c["mean_dice"] for c in cases]),
            "auroc_by_uncertainty": {
                kind: {"pooled": metrics.binned_auroc(*pooled.by_map[kind]),
                       **metrics.summarise([c["auroc_by_uncertainty"].get(kind) for c in cases]),
                       "spearman_case_score_vs_dice": metrics.spearman(
                           [c["case_score_by_uncertainty"].get(kind) for c in cases], [c["mean_dice"] for c in cases])}
                for kind in pooled.by_map
            },
            "timings": {k: metrics.summarise([c["timings"].get(k) for c in cases]) for k in timing_keys},
            "wall_s": wall,
        }
        settings = {
            "network": self.cfg.network,
            "labels": names,
            "samples": getattr(self.segmenter, "num_samples", None),
            "tta_flips": getattr(self.segmenter, "tta_flips", None),
            "steps": getattr(getattr(self.segmenter, "sampler", None), "num_evaluations", None),
            "uncertainty": getattr(self.segmenter, "uncertainty_kind", self.cfg.uncertainty),
            "fusion": self.cfg.fusion,
            "auroc_bins": AUROC_BINS,
            "ece_bins": ECE_BINS,
        }
        report: dict[str, Any] = {
            **(meta or {}),
            "settings": settings,
            "labels": names,
            "summary": summary,
            "reliability": {"all": diagram_all, "foreground": diagram_fg},
            "uncertainty_vs_error": pooled.coarse(),
            "grids": {
                "dice_hd95_auroc": "input grid (the image and label files as given)",
                "ece_ged_ci_auroc_by_uncertainty": "preprocessed grid (RAS, model spacing), truth and raters "
                                                   "resampled nearest",
            },
            "cases": cases,
            "pictures": {},
        }
        report = finite(report)
        if report_dir is not None:
            self.write(report, Path(report_dir), best, worst, pictures)
        return report

    def _slice(self, item: dict, p: dict, record: dict, prefer: str) -> dict:
        """One 2D slice of a case for the picture: the slice (last axis) with the most foreground
        (``prefer="fg"``) or the most wrong voxels (``"error"``)."""
        truth, label, u = p["truth"], p["label"], p["u"]
        image = load_image(item["image"])[0].float()
        if truth.ndim == 3:
            weight = (p["error"] if prefer == "error" and bool(p["error"].any()) else (truth > 0) | (label > 0))
            z = int(weight.sum(dim=(0, 1)).argmax())
            take = lambda x: x[..., z].numpy()  # noqa: E731
            where = f"slice {z}"
        else:
            take = lambda x: x.numpy()  # noqa: E731
            where = "2D"
        return {"id": item["id"], "where": where, "dice": record["dice"], "image": take(image.reshape(truth.shape)),
                "truth": take(truth), "label": take(label), "u": take(u)}

    def write(self, report: dict, out: Path, best, worst, pictures: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        pics: dict[str, str] = {}
        if pictures:
            names = list(self.cfg.labels)
            for key, entry in (("best_case", best), ("worst_case", worst)):
                if entry is None:
                    continue
                s = entry[1]
                dice = ", ".join(f"{n} {v:.3f}" for n, v in s["dice"].items() if v is not None)
                title = f"{key.replace('_', ' ')}: {s['id']} ({s['where']}), Dice {dice}"
                rep.plot_case(out / f"{key}.png", title, s["image"], s["truth"], s["label"], s["u"], names)
                pics[key] = f"{key}.png"
            s = report["summary"]
            rep.plot_reliability(out / "reliability.png", report["reliability"]["all"], s["ece"]["pooled"],
                                 "all voxels,")
            pics["reliability"] = "reliability.png"
            if report["reliability"]["foreground"]["count"] and sum(report["reliability"]["foreground"]["count"]):
                rep.plot_reliability(out / "reliability_foreground.png", report["reliability"]["foreground"],
                                     s["ece_foreground"]["pooled"], "foreground,")
                pics["reliability_foreground"] = "reliability_foreground.png"
            uve = report["uncertainty_vs_error"]
            rep.plot_uncertainty_error(out / "uncertainty_vs_error.png", uve["bin_edges"], uve["errors"],
                                       uve["correct"], s["auroc"]["pooled"])
            pics["uncertainty_vs_error"] = "uncertainty_vs_error.png"
            rep.plot_score_vs_dice(out / "case_score_vs_dice.png", [c["case_score"] for c in report["cases"]],
                                   [c["mean_dice"] for c in report["cases"]],
                                   s["spearman_case_score_vs_dice"]["rho"])
            pics["case_score_vs_dice"] = "case_score_vs_dice.png"
        report["pictures"] = pics
        write_json(report, out / "report.json")
        rep.write_text(rep.evaluation_html(report), out / "report.html")


def _as_tensor(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def evaluate(segmenter, items: Sequence[dict], report_dir: str | Path | None = None, progress: bool = False,
             meta: dict | None = None, pictures: bool = True) -> dict:
    """Evaluate ``segmenter`` on labelled ``items``; see :class:`Evaluator`."""
    return Evaluator(segmenter, progress=progress).run(items, report_dir, meta=meta, pictures=pictures)


def select_items(items: list[dict], subset: str = "all", val_split: float = 0.2, split_seed: int = 0,
                 cases: Sequence[str] | None = None, max_cases: int | None = None) -> list[dict]:
    """Labelled items to evaluate: all, or the validation part of ``segdiff train``'s split (same
    ``val_split`` and seed give the same cases), optionally restricted to ``cases`` ids and the first
    ``max_cases``."""
    items = data.labelled(items)
    if subset == "val":
        items = data.split(items, val_split if len(items) > 1 else 0.0, seed=split_seed)[1]
    elif subset != "all":
        raise ValueError(f"subset must be 'all' or 'val', got {subset!r}")
    if cases:
        wanted = set(cases)
        missing = sorted(wanted - {it["id"] for it in items})
        if missing:
            raise InputError(f"no labelled case named {', '.join(missing)}")
        items = [it for it in items if it["id"] in wanted]
    if max_cases is not None:
        items = items[: max(0, int(max_cases))]
    return items


def evaluate_checkpoint(
    model: str | Path,
    studies: str | Path,
    report_dir: str | Path,
    samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    uncertainty: str | None = None,
    subset: str = "all",
    val_split: float = 0.2,
    split_seed: int = 0,
    cases: Sequence[str] | None = None,
    max_cases: int | None = None,
    progress: bool = False,
    pictures: bool = True,
    postprocess: str | list[str] | None = None,
    tta_flips: int | None = None,
) -> dict:
    """``segdiff evaluate`` as a function: load the checkpoint, evaluate the labelled studies, write
    ``report.json``, ``report.html`` and the pictures to ``report_dir``. ``postprocess`` None: the
    model's stored clean-up."""
    seg = Segmenter.from_checkpoint(model, num_samples=samples, steps=steps, seed=seed, device=device,
                                    uncertainty=uncertainty, postprocess=postprocess, tta_flips=tta_flips)
    items = select_items(data.datalist(studies), subset, val_split, split_seed, cases, max_cases)
    meta = {"model": str(model), "studies": str(studies), "subset": subset, "seed": seed}
    return evaluate(seg, items, report_dir, progress=progress, meta=meta, pictures=pictures)


def summary_text(report: dict) -> str:
    """A short plain-text table of the summary."""
    s = report["summary"]

    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"{s['cases']} case(s)", f"{'label':<16}{'Dice':>8}  {'std':<7}{'HD95 mm':>9}  HD95 undefined"]
    for n in report["labels"]:
        lines.append(f"{n:<16}{f(s['dice'][n]['mean']):>8}  {f(s['dice'][n]['std']):<7}{f(s['hd95'][n]['mean'], 2):>9}"
                     f"  {s['hd95'][n]['n_undefined']}")
    sp = s["spearman_case_score_vs_dice"]
    lines += [
        f"mean Dice {f(s['mean_dice']['mean'])}",
        f"uncertainty-error AUROC pooled {f(s['auroc']['pooled'])} (foreground {f(s['auroc_foreground']['pooled'])})",
        f"ECE pooled {f(s['ece']['pooled'], 4)} (foreground {f(s['ece_foreground']['pooled'], 4)})",
        f"GED {f(s['ged']['mean'])}  CI {f(s['ci']['mean'])}  ({s['ged']['n']} case(s) with raters)",
        f"Spearman(case score, Dice) {f(sp['rho'])} (n={sp['n']})",
        "by uncertainty map (preprocessed grid): "
        + "; ".join(f"{kind} AUROC {f(v['pooled'])} rho {f(v['spearman_case_score_vs_dice']['rho'])}"
                    for kind, v in s.get("auroc_by_uncertainty", {}).items()),
        f"{f(s['timings'].get('total_s', {}).get('mean'), 2)} s per case",
    ]
    return "\n".join(lines)
