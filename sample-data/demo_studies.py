"""Make a demo studies folder for the MONAI Label server: a copy of the phantoms in which 6 cases (the
validation split of ``segdiff train``: 20 %, seed 0) are unlabelled, so Next Sample / scoring / active
learning have work to do. (The shipped model was trained on other phantoms from the same generator,
so none of these cases was seen in training.)

    python sample-data/demo_studies.py /tmp/segdiff-studies
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from monai_segdiff import data

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--val-split", type=float, default=0.2)
    args = ap.parse_args()
    if args.output.exists():
        shutil.rmtree(args.output)
    shutil.copytree(HERE / "phantoms", args.output)
    _, held_out = data.split(data.labelled(data.datalist(args.output)), args.val_split, seed=0)
    for item in held_out:
        for label in (args.output / "labels").glob(f"*/{Path(item['image']).name}"):
            label.unlink()
    print(f"{args.output}: {len(held_out)} unlabelled cases ({', '.join(i['id'] for i in held_out)})")


if __name__ == "__main__":
    main()
