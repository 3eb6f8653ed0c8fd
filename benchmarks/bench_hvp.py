"""HVP and CG costs on all-MiniLM-L6-v2, with curvlinops as a peer in the same run.

Run (about 15 minutes on a 2-core CPU; compile adds a few more):

    python -m pytest benchmarks/bench_hvp.py --benchmark-enable \
        --benchmark-json=bench-hvp.json -p no:cacheprovider
    python benchmarks/summarize.py bench-hvp.json --baseline gradient

Groups:
- ``hvp``: one gradient and one curvature-vector product of each mode/curvature on
  one batch of 16 × 64 tokens (eager attention); ratios against the gradient.
- ``cg-iteration``: one CG solve of (G + λI) x = ∇L over 4 such batches, a fixed
  number of iterations (MFTX_BENCH_CG_ITERS, default 20), for mftx eager, mftx
  ``backend="compile"`` and curvlinops (GGNLinearOperator +
  CGInverseLinearOperator); the time per iteration and the relative difference
  of the solutions go into extra_info.
  The GGN, not the Hessian: on this model and data H + 0.01 I is indefinite
  (mftx's CG stops at negative curvature within 2 iterations, curvlinops'
  carries on), so only a positive definite system has a solution to compare.
  Per-product costs of the Hessian modes are in the ``hvp`` group.

Needs the `bench` extra (curvlinops-for-pytorch); see README.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

import mftx
from mftx import solvers

N_BATCHES = 4
BATCH, LENGTH = 16, 64
# MFTX_BENCH_DTYPE=float64 runs everything in float64: the CG solutions of mftx and
# curvlinops then agree to rounding, which separates algorithmic from float32 differences.
DTYPE = getattr(torch, os.environ.get("MFTX_BENCH_DTYPE", "float32"))
DAMPING = 0.01
CG_ITERS = int(os.environ.get("MFTX_BENCH_CG_ITERS", "20"))

HVP_CASES = [
    ("hessian", "rev-rev", False),
    ("hessian", "fwd-rev", False),
    ("hessian", "double-backward", False),
    ("hessian", "double-backward", True),
    ("ggn", "rev-rev", False),
    ("ggn", "fwd-rev", False),
    ("ggn", "double-backward", True),
]


@pytest.fixture(scope="module")
def minilm():
    from mftx.models import load_classifier

    model, _ = load_classifier("minilm", seed=0)
    model.to(DTYPE).eval()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(N_BATCHES):
        batches.append(
            {
                "input_ids": torch.randint(1000, 20000, (BATCH, LENGTH), generator=gen),
                "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
                "token_type_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long),
                "labels": torch.randint(0, 2, (BATCH,), generator=gen),
            }
        )
    space = mftx.select_params(model)
    return model, batches, space


def _run(benchmark, fn, rounds=4):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="hvp")
def test_gradient(benchmark, minilm):
    model, batches, space = minilm
    op = mftx.Curvature(model, space, batches[:1], mftx.HFClassification())
    _run(benchmark, lambda: op.gradient(batches[:1]))
    benchmark.extra_info["analysed_parameters"] = space.numel


@pytest.mark.benchmark(group="hvp")
@pytest.mark.parametrize(("curvature", "mode", "cache"), HVP_CASES)
def test_product(benchmark, minilm, curvature, mode, cache):
    model, batches, space = minilm
    op = mftx.Curvature(
        model, space, batches[:1], mftx.HFClassification(), curvature=curvature, mode=mode,
        cache_graphs=cache,
    )  # fmt: skip
    v = torch.randn(space.numel, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    _run(benchmark, lambda: op.matvec(v))
    op.release()


# ---------------------------------------------------------------- CG iteration

_solutions = {}


def _difference_to_eager(x: torch.Tensor):
    """‖x − x_ref‖ / ‖x_ref‖ against mftx's eager rev-rev solution (None before it ran)."""
    ref = _solutions.get(("eager", "rev-rev", False))
    return None if ref is None else float((x - ref).norm() / ref.norm())


def _mftx_cg(minilm, backend, mode, cache):
    model, batches, space = minilm
    op = mftx.Curvature(
        model, space, batches, mftx.HFClassification(), curvature="ggn", mode=mode,
        backend=backend, cache_graphs=cache,
    )  # fmt: skip
    g, _ = op.gradient(batches)
    t0 = time.perf_counter()
    op.matvec(g)  # warm-up: compiles for backend="compile", builds graphs when cached
    warm = time.perf_counter() - t0

    def solve():
        return solvers.cg(op.matvec, g, DAMPING, tol=0.0, max_iter=CG_ITERS)

    return op, g, solve, warm


@pytest.mark.benchmark(group="cg-iteration")
@pytest.mark.parametrize(
    ("backend", "mode", "cache"),
    [
        ("eager", "rev-rev", False),
        ("eager", "double-backward", True),
        ("compile", "rev-rev", False),
    ],
)
def test_cg_mftx(benchmark, minilm, backend, mode, cache):
    op, g, solve, warm = _mftx_cg(minilm, backend, mode, cache)
    res = benchmark.pedantic(solve, rounds=1, iterations=1, warmup_rounds=0)
    _solutions[(backend, mode, cache)] = res.x
    benchmark.extra_info.update(
        {
            "dtype": str(DTYPE),
            "relative_difference_to_eager_rev_rev": _difference_to_eager(res.x),
            "iterations": res.iterations,
            "warmup_seconds": warm,
            "seconds_per_iteration": benchmark.stats.stats.mean / res.iterations,
            "relative_residual": res.relative_residual,
        }
    )
    op.release()


@pytest.mark.benchmark(group="cg-iteration")
def test_cg_curvlinops(benchmark, minilm):
    curvlinops = pytest.importorskip("curvlinops")
    from curvlinops._torch_base import PyTorchLinearOperator

    model, batches, space = minilm
    params = list(space.params)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(**x).logits

    class Damped(PyTorchLinearOperator):
        """G + λI: curvlinops 3 has no damping argument."""

        SELF_ADJOINT = True

        def __init__(self, H, lam):
            super().__init__(H._in_shape, H._out_shape)
            self.H, self.lam = H, lam

        def _matmat(self, X):
            return [hx + self.lam * x for hx, x in zip(self.H._matmat(X), X)]

        @property
        def dtype(self):
            return self.H.dtype

        @property
        def device(self):
            return self.H.device

    data = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]
    H = curvlinops.GGNLinearOperator(
        Logits(model), torch.nn.CrossEntropyLoss(), params, data,
        check_deterministic=False, batch_size_fn=lambda x: x["input_ids"].shape[0],
    )  # fmt: skip
    A = Damped(H, DAMPING)
    # Same right-hand side as mftx: the mean training gradient.
    op = mftx.Curvature(model, space, batches, mftx.HFClassification())
    g, _ = op.gradient(batches)
    g_list = [t.clone() for t in space.unflatten(g)]
    counter = {"n": 0}
    base_matmat = A._matmat

    def counted(X):
        counter["n"] += 1
        return base_matmat(X)

    A._matmat = counted
    inv = curvlinops.CGInverseLinearOperator(
        A, max_iter=CG_ITERS, max_tridiag_iter=CG_ITERS, tolerance=1e-12, eps=1e-30
    )
    from linear_operator.utils.warnings import NumericalWarning

    def solve():
        with warnings.catch_warnings():  # it warns when the (unreachable) tolerance is not met
            warnings.simplefilter("ignore", NumericalWarning)
            return inv @ g_list

    x = benchmark.pedantic(solve, rounds=1, iterations=1, warmup_rounds=0)
    x = torch.cat([t.reshape(-1) for t in x])
    info = {
        "dtype": str(DTYPE),
        "matvecs": counter["n"],
        "seconds_per_iteration": benchmark.stats.stats.mean / CG_ITERS,
        "relative_difference_to_mftx": _difference_to_eager(x),
    }
    benchmark.extra_info.update(info)
