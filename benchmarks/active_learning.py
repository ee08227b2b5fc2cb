"""Active learning on a realistic pool: every strategy side by side, 3 seeds (issue 26).

The pool: 140 phantoms (``generate_phantoms.py --seed 77 --count 140 --outlier-rate 0.08``): the 28-case
schedule of the shipped set, then cases where each hard kind (low contrast, noise, blur, bias field, small
lesion) occurs with probability 0.12 and 8 % are failed acquisitions ("corrupt"); 15 % have no lesion.
That is many easy cases, some informative ones and a few outliers. A fifth is the fixed test set, the
rest the pool. Every strategy gets the same learner (a small MedSegDiff on a coarser grid, so a CPU affords
the rounds), the same start and the same training budget per round; only the order of selection differs.

Decision rule, written before the run:
  * the measure is the area under the budget curve (AUBC, Dice vs labelled cases), per seed, compared
    paired by seed; a strategy *beats* another when the mean paired difference exceeds two standard errors;
  * the app's default becomes the scored strategy with the highest AUBC among those that beat fg_random
    (nnActive's foreground-aware random); if none beats it, whole-case selection does not pay on this pool:
    the default stays as it is, the result is reported as such, and partial annotation (the most
    uncertain slices of a case) is the next thing to build;
  * the issue's goal is checked and reported either way: the default reaches random's final Dice with at
    most 60 % of random's labels, and beats fg_random's AUBC by more than two SE.

    python benchmarks/active_learning.py --report /tmp/al-report      # resumable: rerun to continue

Partial annotation (``--partial``, session 17, written before its run): the same pool, learner and budget
per round; each picked case gets 4 annotated slices (the rest of its label unannotated), 4 cases per round
from 4 initial cases to 24 cases (16 -> 96 annotated slices); rules ``random``, ``fg_random`` (a third of the
slices among those with foreground) and ``segdiff_uncertainty`` (the app's ``segdiff_slices``: the cases with
the most uncertain slices, and those slices).
  * the measure is the AUBC over annotated slices, paired by seed, as above;
  * ``segdiff_slices`` becomes the app's default strategy if it beats fg_random in slices by more than two SE;
    otherwise the default stays and the numbers are reported as they are;
  * the goal is checked either way: random's final Dice (in slices) reached with at most 60 % of its slices;
    and, against the whole-case run, the slices partial annotation needs to reach the Dice that whole-case
    random reached with 16 cases.

    python benchmarks/active_learning.py --partial --report /tmp/al-report-slices

Its result (BENCHMARKS.md, session 17): with 40 iterations per round the learner did not improve with more
annotated slices (random 0.381 at 16 slices, 0.359 at 96) and no rule differed beyond noise. Second run,
written before it: the same with 4x the training per round (``--extra --epochs 4``: 160 iterations), same
rule; if the learner then improves with slices, its ordering is the one reported as the decision.

    python benchmarks/active_learning.py --partial --report /tmp/al-report-slices-e4 --extra --epochs 4

Its result: the learner improves with slices (random 0.381 -> 0.391, segdiff_uncertainty 0.381 -> 0.420);
segdiff_uncertainty leads fg_random by +0.0229 +- 0.0149 AUBC (1.5 SE: the rule is not met, the default
stays). A second look, written before it and reported as one: three more seeds (3-5) of the same run; the
default changes only if over all six seeds, paired by seed, segdiff_uncertainty beats fg_random by more
than two SE.

    python benchmarks/active_learning.py --partial --report /tmp/al-report-slices-e4b --extra --epochs 4 --seeds 3-5

Prints the summary table used in BENCHMARKS.md; ``curves.json`` / ``curves.png`` / ``report.html`` in the
report folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = ["--seed", "77", "--count", "140", "--outlier-rate", "0.08"]
SIMULATION = [
    "--strategies", "random,fg_random,segdiff_uncertainty,diverse_uncertainty",
    "--seeds", "0-2", "--initial", "4", "--per-round", "4", "--rounds", "3", "--test-fraction", "0.2",
    "--channels", "16,32,64", "--spacing", "1.5,1.5,3",
    "--initial-epochs", "4", "--epochs", "1", "--iterations-per-epoch", "40", "--batch-size", "8",
    "--samples", "3", "--steps", "2", "--mc-channels", "16,32,64",
]
PARTIAL = {"--strategies": "random,fg_random,segdiff_uncertainty", "--rounds": "5"}  # replaces these values
PARTIAL_EXTRA = ["--unit", "slices", "--slices-per-case", "4"]


def settings(partial: bool) -> list[str]:
    """The al-simulate options of the whole-case run, or of the partial-annotation run."""
    if not partial:
        return list(SIMULATION)
    out = list(SIMULATION)
    for key, value in PARTIAL.items():
        out[out.index(key) + 1] = value
    return out + PARTIAL_EXTRA


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default="/tmp/segdiff-al-pool", help="where the pool is generated (kept for reruns)")
    p.add_argument("--report", default="/tmp/segdiff-al-report")
    p.add_argument("--partial", action="store_true", help="partial annotation: 4 slices per picked case")
    p.add_argument("--merge", nargs="+", metavar="REPORT", help="report folders of the same run with other seeds: "
                   "the table over all their runs, written (summary.json, curves.png) to --report; nothing is run")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more al-simulate options (override)")
    a = p.parse_args()
    if a.merge:
        print(table(merge([Path(m) for m in a.merge], Path(a.report))))
        return 0
    pool = Path(a.pool)
    if not (pool / "cases.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "sample-data" / "generate_phantoms.py"), "--output", str(pool),
                        *POOL], check=True, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "monai_segdiff.cli", "al-simulate", "--studies", str(pool), "--report", a.report,
           *settings(a.partial), *a.extra]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    print(table(json.loads((Path(a.report) / "summary.json").read_text())))
    return 0


def table(summary: dict) -> str:
    """The markdown table of BENCHMARKS.md from ``summary.json``."""
    lines = []
    add = lines.append
    add(f"target: random's final Dice {summary['target_dice']:.4f} at {summary['random_final_n']} labels")
    add("| strategy | final Dice | AUBC ± SE | vs fg_random (paired) | vs random (paired) | labels to target |")
    add("|---|---|---|---|---|---|")
    for name, e in summary["strategies"].items():
        s = summary["per_seed"][name]

        def vs(ref: str) -> str:
            d = s["vs"].get(ref)
            if d is None:
                return "-"
            se = "-" if d["se"] is None else f"{d['se']:.4f}"
            return f"{d['mean']:+.4f} ± {se}" + (" **> 2 SE**" if d["beats_by_2se"] else "")

        reach = e["n_to_reach_target"]
        reached = "-" if reach is None else f"{reach} ({e['fraction_of_labels']:.0%})"
        add(f"| {name} | {e['final_dice']:.4f} | {s['aubc']['mean']:.4f} ± {s['aubc']['se'] or 0:.4f} | "
              f"{vs('fg_random')} | {vs('random')} | {reached} |")
    return "\n".join(lines)


def merge(reports: list[Path], out: Path) -> dict:
    """The summary over the runs of several report folders of one simulation (same settings but seeds)."""
    from monai_segdiff import al_simulation as al
    from monai_segdiff import report as rep
    from monai_segdiff.io import write_json

    results = [json.loads((r / "curves.json").read_text()) for r in reports]
    same = [{k: v for k, v in r["settings"].items() if k != "seeds"} for r in results]
    if any(x != same[0] for x in same):
        raise SystemExit("the report folders were made with different settings (besides the seeds)")
    st = results[0]["settings"]
    runs = [run for r in results for run in r["runs"]]
    c = al.curves(runs, st["strategies"])
    summary = al.label_saving(c, al.initial_budget(st))
    summary["per_seed"] = al.seed_summary(runs, st["strategies"])
    summary["seeds"] = sorted({run["seed"] for run in runs})
    out.mkdir(parents=True, exist_ok=True)
    write_json(summary, out / "summary.json")
    unit = "annotated slices" if st.get("unit") == "slices" else "labelled cases"
    rep.plot_learning_curves(out / "curves.png", c, target=summary["target_dice"], xlabel=unit,
                             title=f"{st['network']} learner, seeds {summary['seeds']}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
