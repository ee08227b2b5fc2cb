#!/usr/bin/env bash
# Rebuild the shipped sample model (apps/segdiff/model/segdiff.pt) from generated phantoms that are not
# the 28 shipped ones: ~90 minutes on a 2-core CPU. Needs `segdiff` on PATH (pip install -e .).
#
#   bash sample-data/train_sample_model.sh [OUTPUT.pt] [WORK_DIR]
#
# Stage 1: 300 phantoms (seed 2025), a new MedSegDiff model with the anchor head, 50 minutes.
# Stage 2: fine-tune it for 35 minutes on 600 phantoms (those 300 plus 300 of seed 2026), with the
#          clean-up a one-organ, one-lesion task wants (median, largest component, fill holes).
# Each stage keeps its best validation epoch (5 % of the cases held out).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-segdiff.pt}"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"

python "$here/generate_phantoms.py" --output "$work/a" --seed 2025 --count 300 > "$work/generate_a.log"
python "$here/generate_phantoms.py" --output "$work/b" --seed 2026 --count 300 > "$work/generate_b.log"

segdiff train --studies "$work/a" --output "$work/stage1.pt" --anchor --seed 0 --max-minutes 50 \
  --iterations-per-epoch 200 --val-split 0.05 --quiet

# one studies folder of 600 cases: b's phantom_XXX becomes phantom_(300 + XXX)
all="$work/all"
mkdir -p "$all/labels/final"
cp "$work/a/labels.json" "$all/"
for i in $(seq 0 299); do
  for src in a b; do
    n=$i; [ "$src" = b ] && n=$((i + 300))
    from=$(printf "phantom_%03d.nii.gz" "$i")
    to=$(printf "phantom_%03d.nii.gz" "$n")
    ln -sf "$work/$src/$from" "$all/$to"
    ln -sf "$work/$src/labels/final/$from" "$all/labels/final/$to"
  done
done

segdiff train --studies "$all" --output "$out" --init "$work/stage1.pt" --seed 1 --max-minutes 35 \
  --iterations-per-epoch 200 --val-split 0.05 --postprocess median,largest_component,fill_holes --quiet
echo "wrote $out (work files in $work)"
