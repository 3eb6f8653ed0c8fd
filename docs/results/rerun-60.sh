#!/usr/bin/env bash
# The three 60 % checkpoints again, under the definitions of "Numbers that survive a
# referee" (issue 18): fair recalibration (k chosen after the selection half's own offset,
# both sides recalibrated, k = 0 a candidate), per-row predictions with paired bootstrap
# intervals and McNemar's test, the two-fold split repeated with five seeds at s0-60,
# and a fresh test set of 2,000 SST-2 training rows that no checkpoint was fine-tuned on
# (every choice made on dev, measured there once).
#   bash docs/results/rerun-60.sh [RUN_DIR]
# The fine-tuning recipe is reproduce.sh's step 1, stopped at 60 % (the same checkpoints:
# same steps, same dev accuracy). Methods: the first-order ones and EK-FAC influence;
# MINRES influence (the reference formula) is left out here: its three 40-iteration solves
# take about 45 min per checkpoint on this machine, and the main run has it.
# Every stage resumes; the report is written to docs/results/rerun-60/.
source "$(dirname "$0")/_env.sh"
OUT="${1:-runs/rerun60}"

CKPTS=()
for seed in 0 1 2; do
  every=4 dir="$OUT/ft-1k-s$seed"
  if [ "$seed" = 2 ]; then every=1 dir="$OUT/ft-1k-s2-every1"; fi
  "$MFTX" finetune --model minilm --data "$DATA" --train-size 1000 --batch-size 16 --lr 2e-5 \
    --targets 0.60 --epochs 6 --eval-every "$every" --seed "$seed" --prefix "s$seed" \
    --out "$dir" --no-progress
  CKPTS+=("$dir/s$seed-60")
done
COMMON=(--data "$DATA" --hvp-batches 4 --heldout --random-draws 3 --fresh-rows 2000
        --fresh-seed 0 --methods gradient,taylor,magnitude,influence-ekfac
        --fidelity-samples 0 --no-progress --out "$OUT/an")
# The two-fold split repeated with four more seeds at s0-60 (about 20 min more on this
# machine); then all three checkpoints on the main split (s0-60's records are reused).
"$MFTX" analyze "${CKPTS[0]}" "${COMMON[@]}" --split-seeds 1,2,3,4
"$MFTX" analyze "${CKPTS[@]}" "${COMMON[@]}"
"$MFTX" report "$OUT/an" --out docs/results/rerun-60
"$PYTHON" docs/results/summarize.py docs/results/rerun-60 > docs/results/rerun-60/summary.md
