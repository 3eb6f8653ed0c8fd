#!/usr/bin/env bash
# docs/benchmarks-peers.md from the runs in benchmarks/results/ (bench_peers.py --table).
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
"${PYTHON:-.venv/bin/python}" benchmarks/bench_peers.py --table \
  before=$R/peers-minilm-ekfac-before.json before=$R/peers-minilm-solvers-before.json \
  before=$R/peers-minilm-spectrum-before.json \
  after=$R/peers-minilm-ekfac-after.json after=$R/peers-minilm-solvers-after.json \
  after=$R/peers-minilm-spectrum-after.json after=$R/peers-minilm-ablation-after.json \
  tiny-agreement=$R/peers-tiny-check.json \
  --out docs/benchmarks-peers.md \
  --note "before: main at 417fc14, measured from a snapshot of its mftx/ package with this script; after: this branch, at the commit in each run's line. Each run's line gives its command." \
  --note "The machine is shared (2 cores, other people's jobs): each run's line gives the load average. Under such load a ratio of the same work moves by tens of percent between runs, so a change smaller than that is not a measured effect; where before and after differ by less, the change did not show." \
  --note "solvers: after, mftx's per-iteration time leaves out the final true-residual product (true_residual=False; scipy computes none); before, MINRES's included it. The products column gives the products of one run." \
  --note "Cached products of 3 stacked vectors (the solvers rows '..., cached: 3 right-hand sides' and the ablation rows '... products, cached: 3 stacked vectors'): measured through is_grads_batched, which the code has since replaced, because of these figures, by products run one after another through the kept graph (with cached graphs there is nothing more to share: expect about 1x)." \
  --note "EK-FAC eigenbases in float32 (eigh_dtype=float32) are opt-in, not the default: the ablation run's notes give how far they move the preconditioned gradient." \
  --note "BERT-base: not measured (no hub access here, and this 2-core machine is too slow for it under load); the MiniLM figures are the only ones."
