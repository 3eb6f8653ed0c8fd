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
  after=$R/peers-minilm-flops-after.json \
  tiny-agreement=$R/peers-tiny-check.json \
  --out docs/benchmarks-peers.md \
  --note "before: main at 417fc14, measured from a snapshot of its mftx/ package with this script; after: this branch, at the commit in each run's line. Each run's line gives its command." \
  --note "The machine is shared (2 cores, other people's jobs): each run's line gives the load average. Under such load a ratio of the same work moves by tens of percent between runs, so a change smaller than that is not a measured effect; where before and after differ by less, the change did not show." \
  --note "solvers: after, mftx's per-iteration time leaves out the final true-residual product (true_residual=False; scipy computes none); before, MINRES's included it. The products column gives the products of one run." \
  --note "Cached products of 3 stacked vectors (the solvers rows '..., cached: 3 right-hand sides' and the ablation rows '... products, cached: 3 stacked vectors'): measured through is_grads_batched, which the code has since replaced, because of these figures, by products run one after another through the kept graph (with cached graphs there is nothing more to share: expect about 1x)." \
  --note "EK-FAC eigenbases in float32 (eigh_dtype=float32) are opt-in, not the default: the ablation run's notes give how far they move the preconditioned gradient." \
  --note "Arithmetic (the flops rows): matmul-family FLOPs counted per aten call with torch's own formulas, not timed, so the machine's load does not move them. A product through kept graphs (mftx cached, and PyHessian's) skips the forward and first backward pass that curvlinops recomputes in every product, and nothing else can be left out of an exact product on the same batches: the cached rows' arithmetic ratio is the floor under a per-iteration time ratio while both sides run the same kernels. The measured per-iteration ratios sit at or a little below it (less elementwise work and Python overhead); a target below that floor needs fewer products (preconditioning, block Krylov), other arithmetic (lower precision) or other batches, not a faster product." \
  --note "Several right-hand sides: through kept graphs a product of stacked vectors shares nothing (each vector's tangent passes are its own arithmetic: the flops rows give equal counts); the uncached rev-rev product shares its forward and first backward pass. Three right-hand sides at half the time of three separate solves would need fewer products, not cheaper ones." \
  --note "EK-FAC: since the flops rows were added, the sampled Fisher draws its labels from the first pass's own forward (before, a separate forward pass per batch drew them); kronfluence is given the labels mftx drew, so neither side pays for drawing. Eigendecompositions are not matmuls and are not in the EK-FAC FLOP counts; at this shape the float64 eigendecompositions of the 1536-wide factors, the same work on both sides, are most of either fit (the ablation row for float32 eigenbases shows their weight), so the fit's time ratio stays well above its matmul ratio." \
  --note "BERT-base: not measured (no hub access here, and this 2-core machine is too slow for it under load); the MiniLM figures are the only ones."
