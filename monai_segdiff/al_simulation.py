"""``segdiff al-simulate``: does uncertainty-driven active learning save annotation work?

A simulation of the MONAI Label annotation loop on a folder whose cases are all labelled:

1. a fixed test split is held out (the same for every strategy and seed);
2. each seed draws ``initial`` labelled cases from the rest (the *pool*); every strategy of that seed
   starts from the same cases and the same round-0 model;
3. each round: the strategy ranks the still-unlabelled pool, the top ``per_round`` cases have their
   labels "revealed", the learner is trained for a fixed budget, warm-started from the previous
   round's weights, and evaluated (mean foreground Dice) on the test split.

The *learner* is the same diffusion model for every strategy, so the curves differ only by which cases
were picked. Strategies (the selection rules are in :mod:`monai_segdiff.selection`):

* ``random``: uniform over the pool (seeded).
* ``fg_random``: nnActive's foreground-aware random ("Random 33% FG"): a third of the picks drawn among
  the cases whose (hidden) label contains a foreground class, the rest uniformly.
* ``segdiff_uncertainty``: the learner's own ensemble, ranked by ``Prediction.stats["case_score"]``
  from :class:`~monai_segdiff.segmenter.Segmenter` -- the exact call the MONAI Label app's scoring task
  makes (``apps/segdiff/lib/scoring``), with the app's default 3 samples x 2 steps.
* ``mc_dropout``: MONAI Label's epistemic approach: a deterministic UNet with dropout (``network="unet"``),
  trained alongside on the same labelled cases (also warm-started), scored by the same ``case_score``
  on its MC-dropout samples. It only chooses cases; the curve is still the diffusion learner's Dice.
* ``diverse_uncertainty``: ``segdiff_uncertainty``'s scores, guarded against outliers and redundancy
  (:func:`~monai_segdiff.selection.diverse_top`): the least typical tenth of the pool set aside, the most
  uncertain typical cases clustered on the learner's image-path features
  (:meth:`~monai_segdiff.segmenter.Segmenter.features`), the most uncertain case of each cluster.

Outputs in the report folder, rewritten after every round so a long run can be watched:
``curves.json`` (every round of every run, settings, summary), ``curves.png`` (mean Dice vs labelled
cases with mean +- std over seeds and min-max bars), ``summary.json`` (label saving) and
``report.html``.

Label saving: the target is random's final mean Dice; for each strategy the first labelled-case count
whose mean Dice (over seeds) reaches it, as a fraction of random's final count (``fraction_of_labels``)
and of the labels added after the initial set (``fraction_of_added_labels``); also per seed (each seed's
own random run as the target), with mean and standard error. Area under the budget curve (AUBC): the
trapezoid area under Dice vs labelled cases divided by the labelled range, per run; reported as the mean
and standard error over seeds, and as the paired per-seed difference to ``fg_random`` and ``random``.

**Partial annotation** (``unit="slices"``): the annotator labels only ``slices_per_case`` slices of each
picked case (the rest of its label is unannotated, ``data.annotated_slices``; the learner trains on the
annotated slices only), and the budget is the number of annotated slices. Every rule picks ``per_round``
cases and their slices: ``random`` random cases and random slices; ``fg_random`` random cases, a third of
their slices among those holding foreground (nnActive's baseline in slices); ``segdiff_uncertainty`` the
cases whose most uncertain slices (``selection.uncertain_slices`` on the prediction's per-slice scores,
``stats["slice_scores"]``, as the app's ``segdiff_slices`` strategy) are the most uncertain on average,
and those slices. The initial cases get random slices, the same for every rule of a seed.

A run can be stopped and started again with the same command: finished rounds are read back from
``curves.json`` and the models of the last finished round from ``.resume/`` in the report folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from . import metrics
from . import report as rep
from . import selection
from .config import SegDiffConfig, load_checkpoint
from .io import load_image, load_label, write_json
from .labelset import label_names
from .networks import build_network
from .planning import new_config
from .segmenter import Segmenter
from .training import load_cases, train
from .transforms import apply, preprocess_transforms
from .uncertainty import fuse
from .values import finite

__all__ = ["STRATEGIES", "ACQUISITIONS", "SimulationSettings", "simulate", "label_saving", "summary_text"]

STRATEGIES = ("random", "fg_random", "segdiff_uncertainty", "mc_dropout", "diverse_uncertainty")
ACQUISITIONS = ("top", "power")
UNITS = ("cases", "slices")
SLICE_STRATEGIES = ("random", "fg_random", "segdiff_uncertainty")  # the rules with a slice-level form
ALIASES = {"uncertainty": "segdiff_uncertainty", "segdiff": "segdiff_uncertainty", "epistemic": "mc_dropout",
           "mcdropout": "mc_dropout", "mc-dropout": "mc_dropout", "foreground_random": "fg_random",
           "random_fg": "fg_random", "diverse": "diverse_uncertainty"}


@dataclass
class SimulationSettings:
    """Everything that defines a simulation (stored in ``curves.json``).

    Args:
        strategies: subset of ``STRATEGIES`` (aliases: ``uncertainty``, ``epistemic``).
        seeds: one run per seed and strategy (initial cases, random picks, training noise).
        initial: labelled cases at round 0.
        per_round: cases labelled per round.
        rounds: rounds after round 0 (stops early when the pool is empty).
        test_fraction: share of the labelled cases held out for testing (split seed 0, fixed).
        network, channels, spacing, roi_size, prediction_type: the diffusion learner (None: the
            ``segdiff train`` defaults; spacing and ROI automatic from the images).
        epochs, iterations_per_epoch, max_minutes: training budget of every round.
        initial_epochs: epochs of round 0 (from scratch); None = ``epochs``.
        batch_size, lr: optimiser settings.
        samples, steps: ensemble used to score (``segdiff_uncertainty``) and to evaluate.
        mc_samples: MC-dropout passes of the ``mc_dropout`` scorer.
        uncertainty: voxel map both scorers rank by (``entropy``, ``mutual_information``,
            ``variance``, ``disagreement``; None: the model's own, as the app does by default).
        mc_channels: channels of the MC-dropout UNet.
        acquisition: how the scored strategies turn scores into picks: ``top`` (the highest scores, as
            the app's strategy does) or ``power`` (stochastic power acquisition, Kirsch et al. 2023:
            ``per_round`` cases drawn without replacement with probability proportional to
            ``score ** power_beta``, which spreads the picks over the uncertain cases instead of
            taking only the most extreme ones).
        power_beta: exponent of ``power`` acquisition.
        fg_share: share of ``fg_random``'s picks drawn among cases containing foreground.
        unit: ``cases`` (whole cases are annotated) or ``slices`` (partial annotation: each picked case
            has only ``slices_per_case`` of its slices annotated; the budget is counted in annotated slices;
            see the module doc).
        slices_per_case: annotated slices per picked case (``unit="slices"``).
        device: torch device.
    """

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0])
    initial: int = 2
    per_round: int = 1
    rounds: int = 5
    test_fraction: float = 0.25
    network: str = "medsegdiff"
    channels: list[int] | None = None
    spacing: list[float] | None = None
    roi_size: list[int] | None = None
    prediction_type: str = "sample"
    epochs: int | None = 2
    iterations_per_epoch: int | None = 20
    max_minutes: float | None = None
    initial_epochs: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    samples: int = 3
    steps: int = 2
    mc_samples: int = 5
    uncertainty: str | None = None
    mc_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    acquisition: str = "top"
    power_beta: float = 1.0
    fg_share: float = selection.FG_SHARE
    unit: str = "cases"
    slices_per_case: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        names = [ALIASES.get(s.strip().lower(), s.strip().lower()) for s in self.strategies if s.strip()]
        unknown = [s for s in names if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {', '.join(unknown)}; valid: {', '.join(STRATEGIES)}")
        if not names:
            raise ValueError("give at least one strategy")
        self.strategies = list(dict.fromkeys(names))
        if self.initial < 1 or self.per_round < 1 or self.rounds < 0:
            raise ValueError("initial and per-round must be >= 1, rounds >= 0")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if self.epochs is None and self.max_minutes is None:
            raise ValueError("give a training budget: epochs or max_minutes")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if not 0.0 <= self.fg_share <= 1.0:
            raise ValueError(f"fg share must be in [0, 1], got {self.fg_share}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.unit == "slices":
            other = [n for n in self.strategies if n not in SLICE_STRATEGIES]
            if other:
                raise ValueError(f"with unit slices the strategies are {', '.join(SLICE_STRATEGIES)}; "
                                 f"not {', '.join(other)}")
            if self.slices_per_case < 1:
                raise ValueError("slices per case must be >= 1")
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"acquisition must be one of {', '.join(ACQUISITIONS)}, got {self.acquisition!r}")


# ------------------------------------------------------------------------------------------ models
def learner_config(s: SimulationSettings, studies: str | Path, items: Sequence[dict]) -> SegDiffConfig:
    """The diffusion learner, built as ``segdiff train`` builds a new model (``planning.new_config``)."""
    return new_config(items, label_names(studies, items), network=s.network, channels=s.channels,
                      spacing=s.spacing, roi_size=s.roi_size, prediction_type=s.prediction_type,
                      sample_steps=s.steps, num_samples=s.samples)


def scorer_config(cfg: SegDiffConfig, s: SimulationSettings) -> SegDiffConfig:
    """The MC-dropout UNet: same labels, spacing, intensity handling and patch size as the learner."""
    divisor = 2 ** (len(s.mc_channels) - 1)
    roi = [int(math.ceil(r / divisor) * divisor) for r in cfg.roi_size]
    channels = list(s.mc_channels)
    return cfg.replace(network="unet", channels=channels, attention_levels=[False] * len(channels),
                       norm_num_groups=16 if all(c % 16 == 0 for c in channels) else 8, roi_size=roi,
                       num_samples=s.mc_samples, extra={})


class _Trainer:
    """Train with the round budget, warm-started; keeps the returned weights in memory."""

    def __init__(self, s: SimulationSettings, workdir: Path, progress: bool = False) -> None:
        self.s, self.workdir, self.progress = s, workdir, progress
        self.count = 0

    def __call__(self, cfg: SegDiffConfig, items: Sequence[dict], init_state: dict | None, seed: int,
                 first: bool = False) -> tuple[dict, dict]:
        self.count += 1
        out = self.workdir / f"model_{self.count}.pt"
        epochs = self.s.initial_epochs if first and self.s.initial_epochs is not None else self.s.epochs
        result = train(cfg, list(items), (), output=out, epochs=epochs, max_minutes=self.s.max_minutes,
                       batch_size=self.s.batch_size, lr=self.s.lr, iterations_per_epoch=self.s.iterations_per_epoch,
                       init_state=init_state, seed=seed, device=self.s.device, progress=self.progress)
        state = load_checkpoint(out)[0]
        out.unlink(missing_ok=True)
        return state, {"train_s": result.seconds, "train_steps": result.steps, "train_loss": result.losses[-1]
                       if result.losses else None}


def _segmenter(cfg: SegDiffConfig, state: dict, samples: int, steps: int | None, seed: int, device: str,
               uncertainty: str | None = None) -> Segmenter:
    net = build_network(cfg)
    net.load_state_dict(state)
    return Segmenter(net, cfg, num_samples=samples, steps=steps if cfg.is_diffusion else None, seed=seed,
                     device=device, uncertainty=uncertainty)


def evaluate_dice(seg: Segmenter, cases: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean foreground Dice (and per label) of the fused ensemble on preprocessed test cases."""
    k = seg.cfg.num_classes
    per_case = []
    for image, labels in cases:
        out = seg.ensemble(image)
        label = fuse(out.probs, out.samples, method=seg.cfg.fusion, num_classes=k)
        truth = labels[0].long().reshape(label.shape)
        per_case.append(metrics.dice_per_label(label, truth, k))
    arr = np.asarray(per_case, dtype=np.float64)
    return {"dice": float(np.nanmean(arr)),
            "dice_per_label": {n: float(np.nanmean(arr[:, i])) for i, n in enumerate(seg.cfg.labels)}}


def case_scores(seg: Segmenter, items: Sequence[dict]) -> dict[str, dict]:
    """``{id: {"score", "dice"}}``: the case score exactly as the MONAI Label scoring task computes it
    (``Segmenter(image_path).stats["case_score"]``), and, since the simulation knows the hidden label,
    the case's Dice under the same prediction (to check that high scores mark bad cases)."""
    out = {}
    k = seg.cfg.num_classes
    for item in items:
        pred = seg(item["image"])
        truth = load_label(item["label"], seg.cfg.label_names)[0].long()
        dice = metrics.dice_per_label(pred.label[0].long(), truth, k)
        out[item["id"]] = {"score": float(pred.stats["case_score"]), "dice": float(np.nanmean(dice))}
        if "slice_scores" in pred.stats:  # partial annotation ranks these (popped before the round is stored)
            sl = pred.stats["slice_scores"]
            out[item["id"]]["slice_scores"] = dict(zip(sl["slices"], sl["scores"]))
    return out


# ---------------------------------------------------------------------------------------- summary
def curves(runs: Sequence[dict], strategies: Sequence[str], label: str | None = None) -> dict[str, dict]:
    """Per strategy: labelled-case counts and mean / std / min / max Dice over the seeds' runs (the
    mean over labels, or one ``label``'s Dice)."""
    out = {}
    for name in strategies:
        by_n: dict[int, list[float]] = {}
        seeds = 0
        for run in runs:
            if run["strategy"] != name:
                continue
            seeds += 1
            for r in run["rounds"]:
                value = r["dice"] if label is None else r["dice_per_label"][label]
                by_n.setdefault(int(r["n_labelled"]), []).append(float(value))
        if not by_n:
            continue
        ns = sorted(by_n)
        vals = [np.asarray(by_n[n]) for n in ns]
        out[name] = {
            "n_labelled": ns,
            "mean": [float(v.mean()) for v in vals],
            "std": [float(v.std(ddof=1)) if len(v) > 1 else 0.0 for v in vals],
            "min": [float(v.min()) for v in vals],
            "max": [float(v.max()) for v in vals],
            "runs": [len(v) for v in vals],
            "seeds": seeds,
        }
    return out


def label_saving(curve_set: dict[str, dict], initial: int) -> dict:
    """How many labels each strategy needs to reach random's final mean Dice (see module doc)."""
    summary: dict[str, Any] = {"target_dice": None, "random_final_n": None, "strategies": {}}
    rnd = curve_set.get("random")
    target = final_n = None
    if rnd:
        target, final_n = rnd["mean"][-1], rnd["n_labelled"][-1]
        summary["target_dice"], summary["random_final_n"] = target, final_n
    for name, c in curve_set.items():
        ns, mean = c["n_labelled"], c["mean"]
        reach = None
        if target is not None:
            reach = next((n for n, m in zip(ns, mean) if m >= target - 1e-12), None)
        entry = {
            "final_n_labelled": ns[-1],
            "final_dice": mean[-1],
            "area_under_curve": float(np.mean(mean)),
            "n_to_reach_target": reach,
            "fraction_of_labels": None,
            "fraction_of_added_labels": None,
            "label_saving": None,
        }
        if reach is not None and final_n:
            entry["fraction_of_labels"] = reach / final_n
            entry["label_saving"] = 1.0 - reach / final_n
            if final_n > initial:
                entry["fraction_of_added_labels"] = (reach - initial) / (final_n - initial)
        summary["strategies"][name] = entry
    return summary


def aubc(rounds: Sequence[dict]) -> float:
    """Area under one run's budget curve: trapezoid area under Dice vs labelled cases over the labelled
    range (the mean Dice over the budget; a single round: its Dice)."""
    n = np.asarray([r["n_labelled"] for r in rounds], dtype=np.float64)
    d = np.asarray([r["dice"] for r in rounds], dtype=np.float64)
    if len(n) < 2 or n[-1] == n[0]:
        return float(d.mean())
    return float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(n)) / (n[-1] - n[0]))


def _mean_se(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()) if len(v) else None, "se": se, "n": int(len(v))}


def seed_summary(runs: Sequence[dict], strategies: Sequence[str]) -> dict:
    """Per strategy over seeds: AUBC mean and standard error; the paired per-seed AUBC difference to
    ``fg_random`` and ``random`` (mean, SE, and whether it exceeds two SE); the labelled cases each seed
    needs to reach its own random run's final Dice (None: never within the budget)."""
    by = {(r["strategy"], r["seed"]): r["rounds"] for r in runs if r["rounds"]}
    seeds = sorted({seed for _, seed in by})
    out: dict[str, Any] = {}
    for name in strategies:
        mine = {seed: by[(name, seed)] for seed in seeds if (name, seed) in by}
        if not mine:
            continue
        entry: dict[str, Any] = {"aubc": _mean_se([aubc(r) for r in mine.values()]), "vs": {}}
        for ref in ("fg_random", "random"):
            pairs = [aubc(r) - aubc(by[(ref, seed)]) for seed, r in mine.items() if (ref, seed) in by]
            if ref != name and pairs:
                diff = _mean_se(pairs)
                diff["beats_by_2se"] = bool(diff["se"] is not None and diff["mean"] > 2 * diff["se"])
                entry["vs"][ref] = diff
        reach = []
        for seed, r in mine.items():
            if ("random", seed) not in by:
                continue
            target = by[("random", seed)][-1]["dice"]
            reach.append(next((x["n_labelled"] for x in r if x["dice"] >= target - 1e-12), None))
        got = [x for x in reach if x is not None]
        entry["n_to_reach_random_final"] = {"per_seed": reach, "reached": len(got), **_mean_se(got)}
        out[name] = entry
    return out


def _write(out: Path, result: dict, pictures: bool = True) -> None:
    c = curves(result["runs"], result["settings"]["strategies"])
    result["curves"] = c
    labels = result.get("learner", {}).get("labels", [])
    result["curves_per_label"] = {n: curves(result["runs"], result["settings"]["strategies"], n) for n in labels}
    st = result["settings"]
    result["summary"] = label_saving(c, initial_budget(st))
    result["summary"]["per_seed"] = seed_summary(result["runs"], result["settings"]["strategies"])
    safe = finite(result)
    write_json(safe, out / "curves.json")
    write_json(safe["summary"], out / "summary.json")
    if pictures and c:
        s = result["settings"]
        unit = ("labelled cases" if s.get("unit", "cases") == "cases"
                else f"annotated slices ({s['slices_per_case']} per case)")
        title = (f"{s['network']} learner, {s['initial']} initial + {s['per_round']}/round cases, "
                 f"{len(s['seeds'])} seed(s), test {result['split']['test']} cases")
        rep.plot_learning_curves(out / "curves.png", c, target=safe["summary"]["target_dice"], title=title, xlabel=unit)
        for i, (name, per_label) in enumerate(result["curves_per_label"].items()):
            if per_label:
                rep.plot_learning_curves(out / f"curves_label{i + 1}.png", per_label, ylabel=f"test Dice of {name}",
                                         title=f"{name}: {title}", xlabel=unit)
    rep.write_text(rep.al_html(safe), out / "report.html")


# ------------------------------------------------------------------------------------ simulation
def _pick(strategy: str, pool: list[dict], scores: dict[str, dict] | None, n: int, rng: random.Random,
          acquisition: str = "top", beta: float = 1.0, classes: dict[str, set[int]] | None = None,
          features: dict[str, np.ndarray] | None = None, fg_share: float = selection.FG_SHARE) -> list[str]:
    ids = sorted(it["id"] for it in pool)
    if strategy == "fg_random":
        return selection.foreground_random(ids, classes or {}, n, rng, fg_share)
    if strategy == "random" or not scores:
        return rng.sample(ids, min(n, len(ids)))
    score = {i: scores[i]["score"] for i in ids}
    if strategy == "diverse_uncertainty":
        return selection.diverse_top(ids, score, features or {}, n, rng)
    if acquisition == "power":
        return selection.power_scores(ids, score, n, rng, beta)
    return selection.top_scores(ids, score, n)


def label_classes(items: Sequence[dict], label_names: dict[str, int]) -> dict[str, set[int]]:
    """``{id: foreground values its label contains}`` (what ``fg_random`` may know, as nnActive's baseline)."""
    return {it["id"]: {int(v) for v in torch.unique(load_label(it["label"], label_names)[0]).tolist() if v > 0}
            for it in items}


def initial_budget(settings: dict) -> int:
    """The budget of the initial labelled cases, in the run's unit (``asdict(SimulationSettings)``)."""
    return settings["initial"] * (settings.get("slices_per_case", 1) if settings.get("unit") == "slices" else 1)


def slice_candidates(items: Sequence[dict], cfg: SegDiffConfig) -> dict[str, tuple[int, list[int]]]:
    """``{id: (axis, input slices)}``: the input slices a slice model sees after resampling (the ones
    ``Segmenter`` scores, ``selection.input_slice_scores``), for the rules without a model."""
    chain = preprocess_transforms(cfg, load=False, image_dims=3)
    out = {}
    for it in items:
        img = load_image(it["image"])
        pre = apply(chain, {"image": img.float()})["image"]
        axis, scores = selection.input_slice_scores(np.zeros(pre.shape[1:]), pre.affine.numpy(), img.affine.numpy(),
                                                    img.shape[1:])
        out[it["id"]] = (axis, sorted(scores))
    return out


def foreground_slice_sets(items: Sequence[dict], label_names: dict[str, int],
                          axes: dict[str, tuple[int, list[int]]]) -> dict[str, set[int]]:
    """``{id: input slices whose (hidden) label holds foreground}`` along each case's slice axis."""
    out = {}
    for it in items:
        lab = load_label(it["label"], label_names)[0] > 0
        axis = axes[it["id"]][0]
        others = tuple(a for a in range(lab.ndim) if a != axis)
        out[it["id"]] = {int(j) for j in torch.nonzero(lab.amax(dim=others)).flatten().tolist()}
    return out


def _pick_slices(strategy: str, pool_ids: Sequence[str], n: int, k: int, rng: random.Random,
                 axes: dict[str, tuple[int, list[int]]], foreground: dict[str, set[int]] | None,
                 slice_scores: dict[str, dict[int, float]] | None, fg_share: float) -> dict[str, list[int]]:
    """``{case id: slices}`` of one round of partial annotation (module doc)."""
    ids = sorted(pool_ids)
    if strategy == "segdiff_uncertainty" and slice_scores:
        best = {i: selection.case_slices(slice_scores[i], k) for i in ids}
        return {i: best[i][0] for i in selection.top_scores(ids, {i: b[1] for i, b in best.items()}, n)}
    picked = rng.sample(ids, min(n, len(ids)))
    if strategy == "fg_random":
        return {i: selection.foreground_slices(axes[i][1], (foreground or {}).get(i, set()), k, rng, fg_share)
                for i in picked}
    return {i: selection.random_slices(axes[i][1], k, rng) for i in picked}


class _Resume:
    """The models of each run's last finished round under ``<report>/.resume`` (written atomically), and
    the finished rounds of an earlier ``curves.json`` made with the same settings and split (strategies and
    seeds may differ: more of either extends it)."""

    def __init__(self, out: Path, result: dict) -> None:
        self.dir = out / ".resume"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs: dict[tuple[str, int], dict] = {}
        try:
            old = json.loads((out / "curves.json").read_text())
        except (OSError, ValueError):
            return
        # runs are kept by (strategy, seed): another list of strategies or seeds extends a finished simulation
        other = {k: v for k, v in (old.get("settings") or {}).items() if k not in ("strategies", "seeds")}
        mine = {k: v for k, v in finite(result["settings"]).items() if k not in ("strategies", "seeds")}
        if other == mine and old.get("split") == result["split"]:
            self.runs = {(r["strategy"], int(r["seed"])): r for r in old.get("runs", [])}

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def save(self, key: str, states: dict) -> None:
        tmp = self._path(key).with_suffix(".tmp")
        torch.save(states, tmp)
        os.replace(tmp, self._path(key))

    def load(self, key: str) -> dict | None:
        try:
            return torch.load(self._path(key), weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None


def simulate(
    studies: str | Path,
    settings: SimulationSettings,
    report_dir: str | Path,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the simulation (resuming an interrupted one in the same report folder); write and return
    ``curves.json``'s content (see the module doc)."""
    s = settings
    out = Path(report_dir)
    say = log or (lambda msg: None)
    items = data_mod.labelled(data_mod.datalist(studies))
    if len(items) < s.initial + 2:
        raise ValueError(f"need at least {s.initial + 2} labelled cases, {studies} has {len(items)}")
    pool_all, test = data_mod.split(items, s.test_fraction, seed=0)
    if len(pool_all) <= s.initial:
        raise ValueError(f"the pool ({len(pool_all)} cases after the test split) must exceed --initial {s.initial}")
    cfg = learner_config(s, studies, items)
    ucfg = scorer_config(cfg, s) if "mc_dropout" in s.strategies else None
    out.mkdir(parents=True, exist_ok=True)
    test_cases = load_cases(test, cfg)
    classes = label_classes(pool_all, cfg.label_names) if "fg_random" in s.strategies else None
    partial = s.unit == "slices"
    axes = slice_candidates(pool_all, cfg) if partial else {}
    fg_slices = foreground_slice_sets(pool_all, cfg.label_names, axes) if partial and classes is not None else None
    result: dict[str, Any] = {
        "studies": str(studies),
        "settings": asdict(s),
        "learner": cfg.to_dict(),
        "scorer": ucfg.to_dict() if ucfg else None,
        "split": {"pool": len(pool_all), "test": len(test), "test_ids": [it["id"] for it in test]},
        "runs": [],
    }
    resume = _Resume(out, result)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work:
        trainer = _Trainer(s, Path(work), progress=progress)
        for seed in s.seeds:
            initial_ids = sorted(random.Random(seed).sample(sorted(it["id"] for it in pool_all), s.initial))
            by_id = {it["id"]: it for it in pool_all}
            initial_slices = ({i: selection.random_slices(axes[i][1], s.slices_per_case, random.Random(seed * 31 + j))
                               for j, i in enumerate(initial_ids)} if partial else {})

            def items_of(ids: Sequence[str], annotated: dict[str, list[int]]) -> list[dict]:
                """The labelled items; with partial annotation, each with its record of annotated slices."""
                return [dict(by_id[i], annotated={"axis": axes[i][0], "slices": annotated[i]}) if partial
                        else by_id[i] for i in ids]

            def budget(ids: Sequence[str], annotated: dict[str, list[int]]) -> int:
                """Labelled cases, or annotated slices."""
                return sum(len(v) for v in annotated.values()) if partial else len(ids)
            finished = {name: resume.runs[(name, seed)] for name in s.strategies
                        if (name, seed) in resume.runs and _finished(resume.runs[(name, seed)], s, len(pool_all))}
            if len(finished) == len(s.strategies):  # this seed ran before: nothing to train
                result["runs"] += [finished[name] for name in s.strategies]
                continue
            # round 0 is the same for every strategy of this seed: train once
            round0 = resume.load(f"seed{seed}-round0")
            t0 = time.perf_counter()
            if round0 is None:
                state0, info0 = trainer(cfg, items_of(initial_ids, initial_slices), None, seed=seed * 1000, first=True)
                dice0 = evaluate_dice(_segmenter(cfg, state0, s.samples, s.steps, 0, s.device), test_cases)
                ustate0 = None
                if ucfg is not None:
                    ustate0, _ = trainer(ucfg, [by_id[i] for i in initial_ids], None, seed=seed * 1000, first=True)
                resume.save(f"seed{seed}-round0", {"learner": state0, "scorer": ustate0 or {}})
                round0 = {"learner": state0, "scorer": ustate0 or {}}
                say(f"seed {seed}: round 0, {s.initial} labelled, Dice {dice0['dice']:.4f} ({time.perf_counter() - t0:.0f} s)")
            else:
                dice0 = info0 = None
            for strategy in s.strategies:
                done = resume.runs.get((strategy, seed))
                run = {"strategy": strategy, "seed": seed, "rounds": list(done["rounds"]) if done else []}
                result["runs"].append(run)
                if not run["rounds"]:
                    if dice0 is None:  # round 0 came from .resume but no run recorded it: evaluate again
                        dice0 = evaluate_dice(_segmenter(cfg, round0["learner"], s.samples, s.steps, 0, s.device), test_cases)
                        info0 = {"train_s": None, "train_steps": None, "train_loss": None}
                    run["rounds"].append({"round": 0, "n_labelled": budget(initial_ids, initial_slices),
                                          "labelled": list(initial_ids), "picked": [], **dice0, **info0,
                                          "score_s": 0.0, **({"annotated": initial_slices} if partial else {})})
                labelled_ids = list(run["rounds"][-1]["labelled"])
                annotated = {i: list(v) for i, v in (run["rounds"][-1].get("annotated") or {}).items()}
                first = len(run["rounds"])
                if _finished(run, s, len(pool_all)):  # finished before
                    continue
                last = resume.load(f"{strategy}-seed{seed}") if first > 1 else round0
                if last is None or (first > 1 and last.get("round") != first - 1):  # models lost: start again
                    run["rounds"], labelled_ids, first, last = run["rounds"][:1], list(initial_ids), 1, round0
                    annotated = {i: list(v) for i, v in initial_slices.items()}
                state, ustate = last["learner"], last["scorer"] or None
                _write(out, result)
                for r in range(first, s.rounds + 1):
                    pool = [by_id[i] for i in sorted(by_id) if i not in labelled_ids]
                    if not pool:
                        break
                    t0 = time.perf_counter()
                    scores = features = None
                    if strategy in ("segdiff_uncertainty", "diverse_uncertainty"):
                        seg = _segmenter(cfg, state, s.samples, s.steps, 0, s.device, s.uncertainty)
                        scores = case_scores(seg, pool)
                        if strategy == "diverse_uncertainty":
                            features = {it["id"]: seg.features(it["image"]).numpy() for it in pool}
                    elif strategy == "mc_dropout":
                        scores = case_scores(_segmenter(ucfg, ustate, s.mc_samples, None, 0, s.device, s.uncertainty), pool)
                    score_s = time.perf_counter() - t0
                    chosen = None
                    per_slice = {i: v.pop("slice_scores", {}) for i, v in scores.items()} if scores else None
                    if partial:
                        chosen = _pick_slices(strategy, [it["id"] for it in pool], s.per_round, s.slices_per_case,
                                              random.Random(seed * 7919 + r), axes, fg_slices, per_slice, s.fg_share)
                        picked = list(chosen)
                        annotated.update(chosen)
                    else:
                        picked = _pick(strategy, pool, scores, s.per_round, random.Random(seed * 7919 + r),
                                       s.acquisition, s.power_beta, classes, features, s.fg_share)
                    labelled_ids += picked
                    train_items = items_of(labelled_ids, annotated)
                    state, info = trainer(cfg, train_items, state, seed=seed * 1000 + r)
                    if strategy == "mc_dropout":
                        ustate, _ = trainer(ucfg, train_items, ustate, seed=seed * 1000 + r)
                    dice = evaluate_dice(_segmenter(cfg, state, s.samples, s.steps, 0, s.device), test_cases)
                    entry = {"round": r, "n_labelled": budget(labelled_ids, annotated), "labelled": list(labelled_ids),
                             "picked": picked, **dice, **info, "score_s": score_s}
                    if partial:
                        entry["annotated"] = {i: list(v) for i, v in annotated.items()}
                        entry["picked_slices"] = chosen
                        if fg_slices is not None:
                            entry["picked_foreground_slices"] = sum(len(set(v) & fg_slices[i]) for i, v in chosen.items())
                    if classes is not None:
                        entry["picked_classes"] = [sorted(classes[i]) for i in picked]
                    if scores:
                        entry["pool_scores"] = scores
                        entry["pool_spearman_score_vs_dice"] = metrics.spearman(
                            [v["score"] for v in scores.values()], [v["dice"] for v in scores.values()])
                        entry["picked_dice"] = [scores[i]["dice"] for i in picked]
                        entry["pool_mean_dice"] = float(np.mean([v["dice"] for v in scores.values()]))
                    run["rounds"].append(entry)
                    resume.save(f"{strategy}-seed{seed}", {"round": r, "learner": state, "scorer": ustate or {}})
                    _write(out, result)
                    say(f"seed {seed} {strategy}: round {r}, {entry['n_labelled']} {s.unit} labelled, picked {picked}, "
                        f"Dice {dice['dice']:.4f} (scoring {score_s:.0f} s, training {info['train_s']:.0f} s)")
    result["seconds"] = time.perf_counter() - t_start
    _write(out, result)
    shutil.rmtree(resume.dir, ignore_errors=True)  # every run finished: curves.json is all a rerun needs
    return finite(result)


def _finished(run: dict, s: SimulationSettings, pool: int) -> bool:
    """A run has all its rounds, or labelled the whole pool."""
    rounds = run.get("rounds") or []
    return bool(rounds) and (len(rounds) > s.rounds or len(rounds[-1]["labelled"]) >= pool)


# ----------------------------------------------------------------------------------------------- CLI
def summary_text(result: dict) -> str:
    s = result["summary"]

    def f(v, d=3):
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    per_seed = s.get("per_seed", {})
    lines = [f"target (random's final Dice): {f(s['target_dice'], 4)} at {f(s['random_final_n'])} labels",
             f"{'strategy':<22}{'final Dice':>11}{'AUBC +- SE':>18}{'vs fg_random +- SE':>22}"
             f"{'labels to target':>18}{'fraction':>10}"]
    for name, e in s["strategies"].items():
        ps = per_seed.get(name, {})
        a, v = ps.get("aubc", {}), ps.get("vs", {}).get("fg_random")
        aubc_txt = f"{f(a.get('mean'), 4)} +- {f(a.get('se'), 4)}" if a else "-"
        vs_txt = f"{v['mean']:+.4f} +- {f(v['se'], 4)}" if v else "-"
        lines.append(f"{name:<22}{f(e['final_dice'], 4):>11}{aubc_txt:>18}{vs_txt:>22}"
                     f"{f(e['n_to_reach_target']):>18}{f(e['fraction_of_labels']):>10}")
    return "\n".join(lines)
