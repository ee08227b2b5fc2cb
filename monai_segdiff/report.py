"""Numbers -> files people read: matplotlib pictures (Agg, no display) and a self-contained HTML page,
for ``segdiff evaluate`` and ``segdiff al-simulate``.

Nothing here computes anything: it draws and tabulates what the evaluation and the active-learning
simulation measured (the statistics live in ``metrics``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write

__all__ = [
    "plot_case",
    "plot_reliability",
    "plot_uncertainty_error",
    "plot_score_vs_dice",
    "plot_learning_curves",
    "evaluation_html",
    "al_html",
    "write_text",
]

LABEL_COLOURS = ["#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
STRATEGY_COLOURS = {"random": "#7f7f7f", "fg_random": "#2ca02c", "segdiff_uncertainty": "#d62728",
                    "mc_dropout": "#1f77b4", "diverse_uncertainty": "#9467bd"}


# ----------------------------------------------------------------------------------------- pictures
def _figure(width: float, height: float):
    # lazy: matplotlib (~0.3 s) only when pictures are drawn; the object API: no pyplot state, no display (Agg)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _label_cmap(num_labels: int):
    from matplotlib.colors import ListedColormap  # lazy: matplotlib only when pictures are drawn

    colours = [(0, 0, 0, 0)] + [LABEL_COLOURS[i % len(LABEL_COLOURS)] for i in range(num_labels)]
    return ListedColormap(colours)


def plot_case(
    path: str | Path,
    title: str,
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    uncertainty: np.ndarray,
    label_names: Sequence[str],
) -> Path:
    """Four panels of one 2D slice: image, ground truth, prediction (label colours over the image) and
    the uncertainty heat map. Arrays are ``[X, Y]`` (shown with X to the right, Y up)."""
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 4)
    cmap = _label_cmap(len(label_names))
    show = dict(origin="lower", interpolation="nearest")
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0, 1)
    for ax, name, overlay in zip(axes[:3], ("image", "ground truth", "prediction"), (None, truth, prediction)):
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, **show)
        if overlay is not None:
            ax.imshow(overlay.T, cmap=cmap, vmin=0, vmax=len(label_names), alpha=0.55, **show)
        ax.set_title(name)
        ax.axis("off")
    im = axes[3].imshow(uncertainty.T, cmap="inferno", vmin=0.0, vmax=max(float(uncertainty.max()), 1e-6), **show)
    axes[3].contour(prediction.T, levels=[0.5], colors="cyan", linewidths=0.6, origin="lower")
    axes[3].set_title("uncertainty (cyan: prediction)")
    axes[3].axis("off")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    handles = [_patch(LABEL_COLOURS[i % len(LABEL_COLOURS)], n) for i, n in enumerate(label_names)]
    fig.legend(handles=handles, loc="lower center", ncols=len(label_names), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def _patch(colour: str, name: str):
    from matplotlib.patches import Patch  # lazy: matplotlib only when pictures are drawn

    return Patch(color=colour, label=name)


def plot_reliability(path: str | Path, diagram: Mapping[str, Any], ece: float | None, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, voxel counts below."""
    edges = np.asarray(diagram["bin_edges"], dtype=np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = np.diff(edges)
    acc = np.asarray([np.nan if a is None else a for a in diagram["accuracy"]], dtype=np.float64)
    conf = np.asarray([np.nan if c is None else c for c in diagram["confidence"]], dtype=np.float64)
    count = np.asarray(diagram["count"], dtype=np.float64)
    fig = _figure(5.5, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.bar(centres, np.nan_to_num(acc), width=width, edgecolor="black", color="#1f77b4", alpha=0.8, label="accuracy")
    lo, hi = np.nan_to_num(np.minimum(acc, conf)), np.nan_to_num(np.maximum(acc, conf))
    top.bar(centres, hi - lo, bottom=lo, width=width, fill=False, hatch="//", edgecolor="#d62728", linewidth=0,
            label="gap |accuracy - confidence|")
    top.plot(centres, conf, "_", color="#d62728", markersize=14, markeredgewidth=2, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    ece_text = "n/a" if ece is None or not math.isfinite(ece) else f"{ece:.4f}"
    top.set_title(f"{title} ECE = {ece_text}".strip())
    bottom.bar(centres, np.maximum(count, 0.5), width=width, color="gray", edgecolor="black")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (max class probability)")
    bottom.set_ylabel("voxels")
    return _save(fig, path)


def plot_uncertainty_error(
    path: str | Path, edges: Sequence[float], errors: Sequence[float], correct: Sequence[float], auroc: float | None
) -> Path:
    """Error rate per uncertainty bin (pooled over cases) and the voxel histogram of the bins."""
    edges = np.asarray(edges, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    total = err + ok
    centres = 0.5 * (edges[:-1] + edges[1:])
    rate = np.divide(err, total, out=np.full_like(err, np.nan), where=total > 0)
    fig = _figure(6, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot(centres[total > 0], rate[total > 0], "o-", color="#d62728")
    top.set_ylabel("voxel error rate")
    top.set_ylim(0, 1)
    text = "n/a" if auroc is None or not math.isfinite(auroc) else f"{auroc:.3f}"
    top.set_title(f"uncertainty vs error (pooled AUROC = {text})")
    top.grid(alpha=0.3)
    bottom.bar(centres, np.maximum(err, 0.5), width=np.diff(edges), color="#d62728", alpha=0.6, label="error")
    bottom.bar(centres, np.maximum(ok, 0.5), width=np.diff(edges), color="gray", alpha=0.4, label="correct")
    bottom.set_yscale("log")
    bottom.set_xlabel("voxel uncertainty")
    bottom.set_ylabel("voxels")
    bottom.legend(loc="upper right")
    return _save(fig, path)


def plot_score_vs_dice(
    path: str | Path, scores: Sequence[float], dices: Sequence[float], rho: float | None
) -> Path:
    """Case uncertainty score against case Dice, one dot per case."""
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    ax.scatter(scores, dices, color="#1f77b4")
    ax.set_xlabel("case uncertainty score")
    ax.set_ylabel("case Dice (mean over labels)")
    text = "n/a" if rho is None else f"{rho:.3f}"
    ax.set_title(f"case score vs Dice (Spearman rho = {text})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(
    path: str | Path,
    curves: Mapping[str, Mapping[str, Any]],
    target: float | None = None,
    title: str = "",
    ylabel: str = "test Dice (mean over labels and cases)",
    xlabel: str = "labelled cases",
) -> Path:
    """Dice vs number of labelled cases per strategy: mean line, shaded mean +- std and min-max dots
    over seeds, and random's final Dice as a dashed line."""
    fig = _figure(7, 4.8)
    ax = fig.subplots()
    for i, (name, c) in enumerate(curves.items()):
        colour = STRATEGY_COLOURS.get(name, LABEL_COLOURS[i % len(LABEL_COLOURS)])
        n = np.asarray(c["n_labelled"], dtype=np.float64)
        mean = np.asarray([np.nan if v is None else v for v in c["mean"]], dtype=np.float64)
        std = np.asarray([0.0 if v is None else v for v in c["std"]], dtype=np.float64)
        ax.plot(n, mean, "o-", color=colour, label=f"{name} ({c.get('seeds', 1)} seed(s))")
        ax.fill_between(n, mean - std, mean + std, color=colour, alpha=0.18)
        if c.get("min") is not None:
            lo = np.asarray([np.nan if v is None else v for v in c["min"]], dtype=np.float64)
            hi = np.asarray([np.nan if v is None else v for v in c["max"]], dtype=np.float64)
            ax.vlines(n, lo, hi, color=colour, alpha=0.5, linewidth=1)
    if target is not None:
        ax.axhline(target, linestyle="--", color="black", linewidth=1, label="random's final Dice")
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib only when pictures are drawn

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "active-learning simulation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- HTML
def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}
code{background:#f4f4f4;padding:1px 4px}
.note{color:#555;font-size:90%}
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def evaluation_html(report: Mapping[str, Any]) -> str:
    """The page of ``segdiff evaluate``: summary, per-label and per-case tables, pictures."""
    s = report["summary"]
    labels = report["labels"]
    parts = [
        f"<p>model <code>{html.escape(str(report.get('model')))}</code>, studies "
        f"<code>{html.escape(str(report.get('studies')))}</code>, {s['cases']} case(s); network "
        f"{_fmt(report['settings'].get('network'))}, {_fmt(report['settings'].get('samples'))} samples x "
        f"{_fmt(report['settings'].get('steps'))} steps, uncertainty {_fmt(report['settings'].get('uncertainty'))}.</p>",
        "<h2>Summary</h2>",
        _table(
            ["measure", "value", "note"],
            [
                ["mean Dice (labels, cases)", s["mean_dice"]["mean"], "foreground labels, input grid"],
                ["uncertainty-error AUROC, pooled", s["auroc"]["pooled"], "all voxels of all cases"],
                ["uncertainty-error AUROC, mean of cases", s["auroc"]["mean"], "all voxels"],
                ["uncertainty-error AUROC, foreground, pooled", s["auroc_foreground"]["pooled"],
                 "truth or prediction foreground only"],
                ["ECE, pooled", s["ece"]["pooled"], "preprocessed grid, all voxels"],
                ["ECE, foreground, pooled", s["ece_foreground"]["pooled"], "truth or prediction foreground"],
                ["GED, mean", s["ged"]["mean"], f"{s['ged']['n']} case(s) with raters"],
                ["CI score, mean", s["ci"]["mean"], f"{s['ci']['n']} case(s) with raters"],
                ["Spearman(case score, case Dice)", s["spearman_case_score_vs_dice"]["rho"],
                 f"p = {_fmt(s['spearman_case_score_vs_dice']['p_value'], 4)}, n = "
                 f"{s['spearman_case_score_vs_dice']['n']}; negative = uncertain cases are worse"],
                ["seconds per case (segmenter)", s["timings"].get("total_s", {}).get("mean"), "mean"],
            ],
        ),
        "<h2>Per label</h2>",
        _table(
            ["label", "Dice mean", "Dice std", "Dice median", "Dice min", "HD95 mean", "HD95 median", "HD95 undefined"],
            [
                [name, s["dice"][name]["mean"], s["dice"][name]["std"], s["dice"][name]["median"],
                 s["dice"][name]["min"], s["hd95"][name]["mean"], s["hd95"][name]["median"],
                 s["hd95"][name]["n_undefined"]]
                for name in labels
            ],
        ),
        "<p class='note'>HD95 in mm on the input grid; undefined when a label is in only one of truth and "
        "prediction. Dice of a label absent from both is 1.</p>",
    ]
    by_map = s.get("auroc_by_uncertainty") or {}
    if by_map:
        parts += [
            "<h2>Uncertainty maps compared</h2>",
            _table(
                ["voxel map", "AUROC pooled", "AUROC mean of cases", "Spearman(case score, Dice)"],
                [[kind, v["pooled"], v["mean"], v["spearman_case_score_vs_dice"]["rho"]] for kind, v in by_map.items()],
            ),
            "<p class='note'>On the preprocessed grid, against the fused prediction's errors; the case score is "
            "the library's <code>case_score</code> computed from each map (what active learning ranks by).</p>",
        ]
    pics = report.get("pictures", {})
    if pics:
        parts.append("<h2>Pictures</h2>")
        for key in ("best_case", "worst_case", "reliability", "reliability_foreground", "uncertainty_vs_error",
                    "case_score_vs_dice"):
            if pics.get(key):
                parts.append(f"<h3>{html.escape(key.replace('_', ' '))}</h3><img src='{html.escape(pics[key])}'>")
    parts.append("<h2>Per case</h2>")
    header = ["case"] + [f"Dice {n}" for n in labels] + [f"HD95 {n}" for n in labels]
    header += ["AUROC", "AUROC fg", "ECE", "GED", "CI", "case score", "seconds"]
    rows = []
    for c in report["cases"]:
        rows.append(
            [c["id"]] + [c["dice"][n] for n in labels] + [c["hd95"][n] for n in labels]
            + [c["auroc"], c["auroc_foreground"], c["ece"], c.get("ged"), c.get("ci"), c["case_score"],
               c["timings"].get("total_s")]
        )
    parts.append(_table(header, rows))
    return _page("segdiff evaluation report", "".join(parts))


def al_html(result: Mapping[str, Any]) -> str:
    """The page of ``segdiff al-simulate``: settings, label saving and the curves."""
    summary = result["summary"]
    rows = []
    for name, s in summary["strategies"].items():
        rows.append([name, s["final_n_labelled"], s["final_dice"], s["area_under_curve"], s["n_to_reach_target"],
                     s["fraction_of_labels"], s["fraction_of_added_labels"], s["label_saving"]])
    settings = result["settings"]
    body = [
        "<p>" + ", ".join(f"{html.escape(str(k))} = <code>{html.escape(str(v))}</code>" for k, v in settings.items())
        + "</p>",
        f"<h2>Label saving</h2><p>target = random's final mean Dice = {_fmt(summary.get('target_dice'), 4)} at "
        f"{_fmt(summary.get('random_final_n'))} labelled cases.</p>",
        _table(
            ["strategy", "final labelled", "final Dice", "mean Dice over rounds", "labels to reach target",
             "fraction of labels", "fraction of added labels", "label saving"],
            rows,
        ),
        "<p class='note'>fraction of labels = labels needed / random's final label count; fraction of added "
        "labels counts only the labels added after the initial set; label saving = 1 - fraction of labels.</p>",
    ]
    per_seed = summary.get("per_seed") or {}
    if per_seed:
        def diff(e, ref):
            d = e["vs"].get(ref)
            return "-" if d is None else (f"{d['mean']:+.4f} +- {_fmt(d['se'], 4)}"
                                          + (" (> 2 SE)" if d.get("beats_by_2se") else ""))

        seed_rows = [[name, e["aubc"]["mean"], e["aubc"]["se"], diff(e, "fg_random"), diff(e, "random"),
                      f"{e['n_to_reach_random_final']['reached']}/{len(e['n_to_reach_random_final']['per_seed'])}",
                      e["n_to_reach_random_final"]["mean"]] for name, e in per_seed.items()]
        body += [
            "<h2>Over seeds</h2>",
            _table(["strategy", "AUBC", "SE", "AUBC - fg_random (paired)", "AUBC - random (paired)",
                    "seeds reaching random's final Dice", "labels to reach it (mean)"], seed_rows),
            "<p class='note'>AUBC: area under the budget curve (Dice vs labelled cases) / labelled range, per "
            "run; SE: standard error over seeds; differences paired by seed.</p>",
        ]
    body.append("<h2>Curves</h2><img src='curves.png'>")
    for i, name in enumerate(result.get("curves_per_label", {})):
        body.append(f"<h3>{html.escape(str(name))}</h3><img src='curves_label{i + 1}.png'>")
    return _page("segdiff active-learning simulation", "".join(body))
