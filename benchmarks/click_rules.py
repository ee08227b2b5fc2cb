"""The click rules of ``follow_clicks`` side by side on the same models (issue 24, session 17).

Trains one ``medsegdiff`` model per task for the same minutes (the held-out split of
``benchmarks/interactive.py``: 4 phantoms; the real spine CT ``slicer_ctchest4``), then runs the simulated
annotator of ``segdiff bench --interactive`` (a click at the centre of the largest error, one at a time)
with ``clicks.SPLIT_ATTACHED`` off (the rules of session 16) and on (a background click on a structure
also removes the part of it that looks like the clicked tissue), within 10 voxels of the click (the reach of
the other rules) or 20 (``clicks.SPLIT_REACH``). Same models, same cases, same seeds: the only difference
is the rule.

    python benchmarks/click_rules.py --minutes 3 --output benchmarks/click-rules.json

Decision, written before the run: a split variant is acceptable if it does not lower the mean Dice after 10
clicks on either task by more than 0.005 against the session-16 rules and raises it on at least one; the
acceptable variant with the higher mean Dice after 10 clicks over both tasks is shipped (reach 10 on a
tie); if neither is acceptable the rule is switched off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from interactive import TASKS, split_studies  # noqa: E402  (the same tasks and held-out cases)

from monai_segdiff import click_bench, clicks, data  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="training minutes per model")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--work", help="folder for the models (kept; an existing model is reused)")
    p.add_argument("--output", default=str(ROOT / "click-rules.json"))
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="segdiff-click-rules-"))
    results = {}
    for task in a.tasks.split(","):
        studies, held_out = TASKS[task]
        model = work / task / "medsegdiff.pt"
        if not model.is_file():
            train, _ = split_studies(studies, held_out, work / task)
            cmd = [sys.executable, "-m", "monai_segdiff.cli", "train", "--studies", str(train), "--output", str(model),
                   "--max-minutes", str(a.minutes), "--quiet"]
            print(" ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        cases = data.labelled(data.datalist(work / task / "test"))
        for name, rule, reach in (("session 16", False, 10), ("split, reach 10", True, 10), ("split, reach 20", True, 20)):
            clicks.SPLIT_ATTACHED, clicks.SPLIT_REACH = rule, reach  # read by follow_clicks at each call
            got = click_bench.run([model], cases, a.max_clicks, progress=False, num_samples=5)[str(model)]  # bench's default
            results[f"{task}/{name}"] = got
    Path(a.output).write_text(json.dumps({"minutes": a.minutes, "max_clicks": a.max_clicks, "work": str(work),
                                          "results": results}, indent=1))
    print("| task | rules | Dice @ 0 / 1 / 3 / 5 / 10 clicks | NoC@85 | NoC@90 | s per click |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        task, rule = key.split("/")
        at = " / ".join(f"{v:.3f}" for v in r["dice_at"].values())
        print(f"| {task} | {rule} | {at} | {r['noc85']:.2f} | {r['noc90']:.2f} | {r['click_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
