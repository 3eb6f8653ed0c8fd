#!/usr/bin/env bash
# Would a longer solve change the answer, and does group fidelity transfer? At s0-60 (the
# checkpoint of rerun-60.sh): influence as the reference study wrote it (MINRES on
# H + 0.01 I) capped at 40, 100 and 200 iterations (each a solve of its own, three
# right-hand sides: all dev rows and both halves), beside EK-FAC, taylor and the gradient
# rule; held-out protocol; group fidelity measured on both halves of dev (in-sample and
# across halves, both ways; 15 random subsets per size). About 45 min on this machine
# (MINRES ≈ 6 s per iteration for the three systems). The Lanczos low-rank inverse at rank
# 20 and 100 (labels influence-lanczos-r20,influence-lanczos-r100) is left out for time.
#   bash docs/results/solves-60.sh [RUN_DIR]
# Needs the s0-60 checkpoint of rerun-60.sh (step 1 of that script fine-tunes it, ~5 min).
# Every stage resumes; the report is written to docs/results/solves-60/.
source "$(dirname "$0")/_env.sh"
OUT="${1:-runs/rerun60}"

"$MFTX" analyze "$OUT/ft-1k-s0/s0-60" --data "$DATA" --hvp-batches 4 --heldout \
  --methods gradient,taylor,influence-ekfac,influence-minres-it40,influence-minres-it100,influence-minres-it200 \
  --group-subsets 15 --group-flagged 0 --fidelity-samples 0 --no-progress --out "$OUT/solves"
"$MFTX" report "$OUT/solves" --out docs/results/solves-60
"$PYTHON" docs/results/summarize.py docs/results/solves-60 > docs/results/solves-60/summary.md
