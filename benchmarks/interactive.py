"""Correction with clicks, side by side at equal training minutes (issue 24).

For each task (the phantoms; the real spine CTs shipped in sample-data/real-spine; with ``--realdev``, the
real development set's tasks) three models (or ``--models``) are trained for the same minutes on the same
training cases, one after another:
  * medsegdiff            the diffusion model as the app trains it; clicks act without retraining (held
                          voxels in every sampling step)
  * medsegdiff + clicks   the same with click guidance channels, trained with simulated clicks
                          (``segdiff train --click-channels``)
  * unet + clicks         a MONAI UNet with DeepEdit's click channels, trained with the same recipe
then ``segdiff bench --interactive`` runs the simulated annotator on the held-out cases.

    python benchmarks/interactive.py --minutes 3 --output benchmarks/interactive.json
    python benchmarks/interactive.py --tasks "" --realdev /tmp/realdev --models medsegdiff unet+clicks \
        --work /tmp/click-rules --output benchmarks/interactive-realdev.json   # the real development set

Writes the JSON of every run and prints the markdown table used in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    # task: (studies folder, held-out case names); the rest of the labelled cases train
    "phantoms": (ROOT / "sample-data" / "phantoms", ["phantom_024", "phantom_025", "phantom_026", "phantom_027"]),
    # ts_example_ct and ts_example_ct_dicom are one scan (NIfTI and DICOM exports): both train, the other CT tests
    "real-spine": (ROOT / "sample-data" / "real-spine", ["slicer_ctchest4"]),
}
# real tasks of sample-data/make_real_dev.py (task: held-out case names; the rest of the task trains).
# ts_example_ct and ts_example_ct_dicom are one scan (NIfTI and DICOM exports): the abdomen model has
# seen its anatomy, at another resolution and field of view; it is the only multi-class real task.
REALDEV = {"abdomen": ["ts_example_ct_dicom"], "lung-tumour": ["pyrad_lung1"], "brain-tumour": ["pyrad_brain1"]}
MODELS = {"medsegdiff": [], "medsegdiff+clicks": ["--click-channels"], "unet+clicks": ["--network", "unet", "--click-channels"]}


def split_studies(studies: Path, held_out: list[str], folder: Path) -> tuple[Path, Path]:
    """Two studies folders of symlinks: the training cases and the held-out ones."""
    train, test = folder / "train", folder / "test"
    for d in (train, test):
        (d / "labels" / "final").mkdir(parents=True, exist_ok=True)
        if (studies / "labels.json").is_file():
            (d / "labels.json").write_text((studies / "labels.json").read_text())
    for label in sorted((studies / "labels" / "final").glob("*.nii.gz")):
        name = label.name[: -len(".nii.gz")]
        d = test if name in held_out else train
        for link, target in ((d / label.name, studies / label.name), (d / "labels" / "final" / label.name, label)):
            if not link.is_symlink():  # a kept --work folder: already split
                os.symlink(target, link)
    return train, test


def select_tasks(names: str, realdev: str | None) -> dict[str, tuple[Path, list[str]]]:
    """The ``TASKS`` named in ``names`` (comma-separated, '' for none) and, with ``realdev`` (a folder built
    by sample-data/make_real_dev.py), its ``REALDEV`` tasks."""
    tasks = {t: TASKS[t] for t in names.split(",") if t}
    if realdev:
        tasks.update({t: (Path(realdev) / t, held) for t, held in REALDEV.items()})
    return tasks


def trained(studies: Path, out: Path, minutes: float, extra: list[str] = ()) -> Path:
    """``out``, trained by ``segdiff train`` on ``studies`` for ``minutes`` unless it exists (a kept --work)."""
    if not out.is_file():
        cmd = [sys.executable, "-m", "monai_segdiff.cli", "train", "--studies", str(studies), "--output", str(out),
               "--max-minutes", str(minutes), "--quiet", *extra]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="training minutes per model")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--tasks", default=",".join(TASKS), help="of TASKS, comma-separated ('' for none)")
    p.add_argument("--realdev", help="a folder built by sample-data/make_real_dev.py: also its REALDEV tasks")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--work", help="folder for the models (kept; an existing model is reused)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "interactive.json"))
    a = p.parse_args()
    results = {}
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="segdiff-interactive-"))
    for task, (studies, held_out) in select_tasks(a.tasks, a.realdev).items():
        train, test = split_studies(studies, held_out, work / task)
        models = [(name, trained(train, work / task / f"{name.replace('+', '_')}.pt", a.minutes, MODELS[name]))
                  for name in a.models]
        bench = work / task / "bench.json"
        subprocess.run([sys.executable, "-m", "monai_segdiff.cli", "bench", "--interactive", "--studies", str(test),
                        "--max-clicks", str(a.max_clicks), "--output", str(bench), "--model", *[str(m) for _, m in models]],
                       check=True)
        got = json.loads(bench.read_text())
        results[task] = {name: got[str(m)] for name, m in models}
    Path(a.output).write_text(json.dumps({"minutes": a.minutes, "max_clicks": a.max_clicks, "results": results}, indent=1))
    print("| task | model | Dice @ 0 / 1 / 3 / 5 / 10 clicks | NoC@85 | NoC@90 | plain s | s per click |")
    print("|---|---|---|---|---|---|---|")
    for task, rs in results.items():
        for name, r in rs.items():
            at = " / ".join(f"{v:.3f}" for v in r["dice_at"].values())
            print(f"| {task} | {name} | {at} | {r['noc85']:.1f} | {r['noc90']:.1f} | {r['plain_s']:.1f} | {r['click_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
