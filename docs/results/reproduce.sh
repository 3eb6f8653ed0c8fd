#!/usr/bin/env bash
# The experiment on the embedded all-MiniLM-L6-v2 behind docs/results/ (issues 12 and 18).
#   bash docs/results/reproduce.sh [RUN_DIR [STAGE ...]]
# Stages, in order (all when none is named): finetune-1k finetune-full analyze-1k
# analyze-full bench report. Every stage resumes from what RUN_DIR holds, so stages can be
# run one at a time, or two side by side with one thread each (their checkpoints differ).
# Run time on this project's 2-core CPU: fine-tuning about 2 h 20 min (2 h 08 min of it the
# all-rows recipe); each checkpoint's analysis about 30 min (10 of it the four further
# splits); the methods benchmark several hours (curvature solves on two checkpoints).
# The reports are written to docs/results/ (main run) and docs/results/methods*/.
source "$(dirname "$0")/_env.sh"
OUT="${1:-runs/i18}"
shift || true
STAGES=("$@")
ALL=(finetune-1k finetune-full analyze-1k analyze-full bench report)
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=("${ALL[@]}"); fi
for stage in "${STAGES[@]}"; do  # every name checked before any work
  if [[ " ${ALL[*]} " != *" $stage "* ]]; then echo "unknown stage: $stage" >&2; exit 2; fi
done

CKPTS_1K=("$OUT/ft-1k-s0/s0-60" "$OUT/ft-1k-s0/s0-75" "$OUT/ft-1k-s1/s1-60"
          "$OUT/ft-1k-s1/s1-75" "$OUT/ft-1k-s2-every1/s2-60" "$OUT/ft-1k-s2-every1/s2-75")
CKPTS_FULL=("$OUT/ft-full/full-85" "$OUT/ft-full/full-88" "$OUT/ft-full/full-90")

# Analysis of every checkpoint under the definitions of "Numbers that survive a referee":
# the reference protocol (everything on the 872 dev rows); the held-out one (a seeded
# two-fold split of dev: validation gradient, scores, k and the recalibration offset from
# one half, accuracy on the other, both ways; k = 0 a candidate; "beyond recalibration" =
# (masked + offset) − (unmasked + offset)) on the main split and four further split seeds;
# 2,000 fresh SST-2 training rows the checkpoint was not fine-tuned on (every choice made on
# dev, measured there once); the random-k control (3 draws); paired bootstrap intervals
# and McNemar's test from per-row predictions; the training loss's Hessian spectrum on the
# HVP batches. Analysis: the reference study's 1,000 training rows (the checkpoint's own
# seed), HVPs on 4 of their 63 batches. Methods: the gradient rule, taylor, magnitude and
# influence through EK-FAC (the sampled Fisher; the default solver). Influence as the
# reference study wrote it (MINRES) is measured at 40 / 100 / 200 iterations at s0-60 by
# solves-60.sh, and beside every other variant by the methods benchmark below.
COMMON=(--data "$DATA" --hvp-batches 4 --heldout --split-seeds 1,2,3,4 --random-draws 3
        --fresh-rows 2000 --fresh-seed 0 --spectrum-steps 30 --spectrum-probes 2
        --methods gradient,taylor,magnitude,influence-ekfac --fidelity-samples 0
        --no-progress --out "$OUT/an")

# The methods benchmark at a 60 % and the 90 % checkpoint: every scoring variant (MINRES on
# H + 0.01 I as written, auto-damped CG, CG on the GGN, the rank-20 Lanczos inverse,
# EK-FAC), single-parameter fidelity on 60 random parameters, group fidelity per k on both
# halves of dev (15 random subsets per k). Main split only.
VARIANTS=gradient,taylor,magnitude,influence,influence-cg-auto,influence-ggn-cg,influence-lanczos,influence-ekfac
BENCH=(--data "$DATA" --hvp-batches 4 --max-iter 40 --heldout --random-draws 3
       --fidelity-samples 60 --group-subsets 15 --group-flagged 0 --group-ks 10,100,1000,10000
       --methods "$VARIANTS" --no-progress)

for stage in "${STAGES[@]}"; do
  case "$stage" in
  finetune-1k)
    # The reference recipe (1,000 rows, batch 16, AdamW lr 2e-5, constant), three seeds,
    # checkpoints at the first evaluation whose accuracy on all 872 dev rows reaches 60 %
    # and 75 %. Seeds 0 and 1 are evaluated every 4 steps; seed 2 after every step: its
    # first run (every 4) jumped from 59 % to 71 % between two evaluations, an interval
    # chosen after seeing that curve.
    for seed in 0 1 2; do
      every=4 dir="$OUT/ft-1k-s$seed"
      if [ "$seed" = 2 ]; then every=1 dir="$OUT/ft-1k-s2-every1"; fi
      "$MFTX" finetune --model minilm --data "$DATA" --train-size 1000 --batch-size 16 \
        --lr 2e-5 --targets 0.60,0.75 --epochs 6 --eval-every "$every" --seed "$seed" \
        --prefix "s$seed" --out "$dir" --no-progress
    done ;;
  finetune-full)
    # 85 / 88 / 90 %: all 67,349 training rows, batch 32, lr 5e-5 with linear warmup (6 %)
    # and decay over 3 epochs, evaluated every 100 steps; stops once every target is met.
    "$MFTX" finetune --model minilm --data "$DATA" --train-size all --batch-size 32 --lr 5e-5 \
      --schedule linear --warmup-ratio 0.06 --targets 0.85,0.88,0.90 --epochs 3 \
      --eval-every 100 --state-every 200 --seed 0 --prefix full --out "$OUT/ft-full" \
      --no-progress ;;
  analyze-1k) "$MFTX" analyze "${CKPTS_1K[@]}" "${COMMON[@]}" ;;
  analyze-full) "$MFTX" analyze "${CKPTS_FULL[@]}" "${COMMON[@]}" ;;
  bench)
    # Each starts from the analysis' records of its checkpoint (scores, held-out sweeps).
    for b in ft-1k-s0/s0-60:bench ft-full/full-90:bench90; do
      ck="$OUT/${b%%:*}" run="$OUT/${b#*:}"
      if [ ! -d "$run/$(basename "$ck")" ]; then
        mkdir -p "$run" && cp -r "$OUT/an/$(basename "$ck")" "$run/"
      fi
      "$MFTX" analyze "$ck" "${BENCH[@]}" --out "$run"
    done ;;
  report)
    # The run index over all nine (every record is already there), then tables, CSV/JSON
    # and plots; paths in every written file are relative to its directory.
    "$MFTX" analyze "${CKPTS_1K[@]:0:2}" "${CKPTS_FULL[@]}" "${CKPTS_1K[@]:2}" "${COMMON[@]}"
    "$MFTX" report "$OUT/an" --out docs/results
    "$PYTHON" docs/results/summarize.py docs/results > docs/results/summary.md
    for b in bench:methods bench90:methods-90; do
      if [ -f "$OUT/${b%%:*}/analysis.json" ]; then
        "$MFTX" report "$OUT/${b%%:*}" --out "docs/results/${b#*:}"
        "$PYTHON" docs/results/summarize.py "docs/results/${b#*:}" \
          > "docs/results/${b#*:}/summary.md"
      fi
    done
    for run in ft-1k-s0 ft-1k-s1 ft-1k-s2-every1 ft-full; do
      "$PYTHON" -c 'import sys; from mftx.fileio import copy_json; copy_json(*sys.argv[1:])' \
        "$OUT/$run/finetune.json" "docs/results/finetune-${run#ft-}.json"
    done ;;
  esac
done
