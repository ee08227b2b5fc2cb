#!/usr/bin/env bash
# Rebuild the shipped sample model (apps/segdiff/model/segdiff.pt) from generated phantoms that are not
# the 28 shipped ones: ~4.2 hours on a 2-core CPU. Needs `segdiff` on PATH (pip install -e .).
#
#   bash sample-data/train_sample_model.sh [OUTPUT.pt] [WORK_DIR]
#
# Stage 1: 300 phantoms (seed 2025), a new MedSegDiff model with the anchor head, 50 minutes.
# Stage 2: fine-tune it for 35 minutes on 600 phantoms (those 300 plus 300 of seed 2026), with the
#          clean-up a one-organ, one-lesion task wants (median, largest component, fill holes).
# Stage 3: fine-tune it for 45 minutes on 1200 phantoms: those 600, 300 more (seed 2028) and 300 rich
#          in hard cases (seed 2030, each hard kind with probability 0.25 instead of 0.12). Its stored
#          clean-up keeps each label's most confident region instead of its largest (session 10), and
#          each ensemble member averages two test-time views, the image and its left-right mirror
#          (session 11).
# Stage 4: fine-tune it for 40 minutes on 1500 phantoms (those 1200 and 300 of seed 2034 with hard rate
#          0.3), the rate falling along a cosine from 1e-3 to 1e-5.
# Stage 5: fine-tune it for 65 minutes on those 1500 and 1120 cases of the shipped set's schedule: the
#          first 28 cases of seeds 4000-4039 have the shipped cases' hard kinds (two or three at once in
#          some) and lesion-free cases, drawn anew; cosine from 5e-4 (session 12). It keeps its last epoch,
#          the end of the decay: its validation Dice stayed flat (0.81-0.83) over the 56 epochs.
# Stages 1-4 keep their best validation epoch (5 % of the cases held out). Time-limited runs are not
# bit-reproducible: a rebuilt model matches the shipped one's quality (BENCHMARKS.md), not its bytes.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-segdiff.pt}"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"

python "$here/generate_phantoms.py" --output "$work/a" --seed 2025 --count 300 > "$work/generate_a.log"
python "$here/generate_phantoms.py" --output "$work/b" --seed 2026 --count 300 > "$work/generate_b.log"
python "$here/generate_phantoms.py" --output "$work/c" --seed 2028 --count 300 > "$work/generate_c.log"
python "$here/generate_phantoms.py" --output "$work/d" --seed 2030 --count 300 --hard-rate 0.25 \
  > "$work/generate_d.log"
python "$here/generate_phantoms.py" --output "$work/e" --seed 2034 --count 300 --hard-rate 0.3 \
  > "$work/generate_e.log"
for seed in $(seq 4000 4039); do
  python "$here/generate_phantoms.py" --output "$work/schedule/$seed" --seed "$seed" --count 28 >> "$work/generate_s.log"
done

segdiff train --studies "$work/a" --output "$work/stage1.pt" --anchor --seed 0 --max-minutes 50 \
  --iterations-per-epoch 200 --val-split 0.05 --quiet

# one studies folder from sources a b ...: their cases in turn become phantom_0000, phantom_0001, ...
join() {
  local dest="$1"; shift
  mkdir -p "$dest/labels/final"
  cp "$work/a/labels.json" "$dest/"
  local k=0 src path name to
  for src in "$@"; do
    for path in "$work/$src"/phantom_*.nii.gz; do
      name=$(basename "$path")
      to=$(printf "phantom_%04d.nii.gz" "$k")
      ln -sf "$path" "$dest/$to"
      ln -sf "$work/$src/labels/final/$name" "$dest/labels/final/$to"
      k=$((k + 1))
    done
  done
}
join "$work/ab" a b
join "$work/abcd" a b c d
join "$work/abcde" a b c d e
join "$work/abcde_s" a b c d e $(cd "$work" && ls -d schedule/*)

segdiff train --studies "$work/ab" --output "$work/stage2.pt" --init "$work/stage1.pt" --seed 1 --max-minutes 35 \
  --iterations-per-epoch 200 --val-split 0.05 --postprocess median,largest_component,fill_holes --quiet
segdiff train --studies "$work/abcd" --output "$work/stage3.pt" --init "$work/stage2.pt" --seed 1 --max-minutes 45 \
  --iterations-per-epoch 200 --val-split 0.05 --postprocess median,confident_component,fill_holes --tta-flips 2 --quiet
segdiff train --studies "$work/abcde" --output "$work/stage4.pt" --init "$work/stage3.pt" --seed 3 --max-minutes 40 \
  --iterations-per-epoch 200 --val-split 0.05 --lr 1e-3 --lr-schedule cosine --tta-flips 2 --quiet
segdiff train --studies "$work/abcde_s" --output "$out" --init "$work/stage4.pt" --seed 4 --max-minutes 65 \
  --iterations-per-epoch 200 --val-split 0.05 --lr 5e-4 --lr-schedule cosine --keep last --tta-flips 2 --quiet
echo "wrote $out (work files in $work)"
