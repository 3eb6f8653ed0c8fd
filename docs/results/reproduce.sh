#!/usr/bin/env bash
# The full experiment on the embedded all-MiniLM-L6-v2 behind docs/results/.
#   bash docs/results/reproduce.sh [RUN_DIR]     (about 3 hours on a 2-core CPU)
# Every stage resumes from what RUN_DIR holds; the report is written to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${MFTX_DATA:-$(cd .. && pwd)/shared/data/sst2}"
OUT="${1:-runs/full}"
MFTX="${MFTX:-.venv/bin/mftx}"
PYTHON="${PYTHON:-.venv/bin/python}"

# 1. The reference recipe: 1,000 training rows, batch 16, AdamW lr 2e-5, up to 6 epochs.
"$MFTX" finetune --model minilm --data "$DATA" --train-size 1000 --batch-size 16 --lr 2e-5 \
  --targets 0.60,0.75,0.85,0.88,0.90 --epochs 6 --eval-every 4 --out "$OUT/finetune-1k"
# 2. The same recipe on 10,000 rows, to reach the higher targets 1,000 rows do not.
"$MFTX" finetune --model minilm --data "$DATA" --train-size 10000 --batch-size 16 --lr 2e-5 \
  --targets 0.85,0.88,0.90 --epochs 2 --eval-every 16 --prefix ckpt10k --out "$OUT/finetune-10k"
# 3. Scores, masking sweeps, overlap and fidelity for every checkpoint reached. Influence
#    through the Hessian (the reference) and through the GGN; HVPs on 16 of the 63
#    training batches (256 rows), CG capped at 100 iterations.
"$MFTX" analyze "$OUT/finetune-1k" "$OUT/finetune-10k" --data "$DATA" --train-size 1000 \
  --methods gradient,influence,influence-ggn --ks 100,500,1000,5000,10000,50000,100000 \
  --damping 0.01 --hvp-batches 16 --max-iter 100 --fidelity-samples 500 --out "$OUT/analysis"
# 4. Tables, CSV/JSON and plots.
#    Paths in every written file are relative to its directory; copy_json re-expresses them.
"$MFTX" report "$OUT/analysis" --out docs/results
for n in 1k 10k; do
  "$PYTHON" -c 'import sys; from mftx.fileio import copy_json; copy_json(*sys.argv[1:])' \
    "$OUT/finetune-$n/finetune.json" "docs/results/finetune-$n.json"
done
