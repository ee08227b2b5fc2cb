#!/usr/bin/env bash
# Benchmarks of the performance issue (P1-P4), side by side in one process; see BENCHMARKS.md.
# usage: benchmarks/run.sh [--quick]   (model: the shipped sample model; data: sample-data/phantoms)
set -euo pipefail
cd "$(dirname "$0")/.."
segdiff bench --model apps/segdiff/model/segdiff.pt --studies sample-data/phantoms "$@" \
    --output "benchmarks/$( [ "${1:-}" = --quick ] && echo quick || echo full )-$(date +%F).json"
