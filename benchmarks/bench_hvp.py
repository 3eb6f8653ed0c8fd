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
- ``solvers``: the solvers side by side on the same 4 batches, each run to the
  relative residual MFTX_BENCH_RESIDUAL (default 1e-3; at most
  MFTX_BENCH_SOLVER_ITERS = 200 iterations) of its own system: CG on G + λI,
  MINRES on H + λI (indefinite; the reference formula), CG on H + λ_auto I
  (``damping="auto"``: Lanczos, then CG); the low-rank inverse's Lanczos cost
  per eigenpair (rank 10); EK-FAC fit and solve. Products, seconds, the
  residual reached, the memory the solver's own state holds (vectors of the
  analysed size, Lanczos basis, EK-FAC factors) and the peak resident memory
  above the case's start (RSS sampled every 10 ms; memory freed by an earlier
  case is reused, so it can undercount) go into extra_info.

    python -m pytest benchmarks/bench_hvp.py -k solver --benchmark-enable \
        --benchmark-json=bench-solvers.json -p no:cacheprovider
    python benchmarks/bench_hvp.py bench-solvers.json     # the table

Needs the `bench` extra (curvlinops-for-pytorch); see README.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

import pytest
import torch

import mftx
from mftx.curvature import spectra
from mftx.inverse import ekfac, solvers
from mftx.inverse.lowrank import LowRankInverse

N_BATCHES = 4
BATCH, LENGTH = 16, 64
# MFTX_BENCH_DTYPE=float64 runs everything in float64: the CG solutions of mftx and
# curvlinops then agree to rounding, which separates algorithmic from float32 differences.
DTYPE = getattr(torch, os.environ.get("MFTX_BENCH_DTYPE", "float32"))
DAMPING = 0.01
CG_ITERS = int(os.environ.get("MFTX_BENCH_CG_ITERS", "20"))
RESIDUAL = float(os.environ.get("MFTX_BENCH_RESIDUAL", "1e-3"))
SOLVER_ITERS = int(os.environ.get("MFTX_BENCH_SOLVER_ITERS", "200"))

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


# ---------------------------------------------------------------- solvers side by side


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms (MiB)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _solver_op(minilm, curvature):
    model, batches, space = minilm
    op = mftx.Curvature(model, space, batches, mftx.HFClassification(), curvature=curvature,
                        mode="double-backward", cache_graphs=True)  # fmt: skip
    g, _ = op.gradient(batches)
    op.matvec(g)  # builds the cached graphs: not part of any solver's cost
    op.n_matvec = 0
    return op, g


def _record(benchmark, op, res, mem, **extra):
    benchmark.extra_info.update(
        {
            "products": op.n_matvec,
            "iterations": res.iterations if res else None,
            "relative_residual": res.relative_residual if res else None,
            "converged": res.converged if res else None,
            "reason": res.reason if res else None,
            "seconds": benchmark.stats.stats.mean,
            "peak_rss_extra_mib_run": mem.extra_mib,
            "damping": DAMPING,
            **extra,
        }
    )


SOLVER_CASES = ["cg-ggn", "minres-hessian", "auto-cg-hessian"]
#: Vectors of the analysed size each solver keeps (CG: x, r, p, Ap; MINRES: x, and the
#: Lanczos and direction vectors v, v_prev, p, d, d_prev, d_prev2).
STATE_VECTORS = {"cg": 4, "minres": 7, "auto-cg": 4}


def _vectors_mib(space, k: int) -> float:
    return k * space.numel * torch.finfo(space.dtype).bits / 8 / 2**20


@pytest.mark.benchmark(group="solvers")
@pytest.mark.parametrize("case", SOLVER_CASES)
def test_solver_to_residual(benchmark, minilm, case):
    name, _, curvature = case.rpartition("-")
    op, g = _solver_op(minilm, curvature)
    out = {}

    def run():
        if name == "minres":
            return solvers.minres(op.matvec, g, DAMPING, tol=RESIDUAL, max_iter=SOLVER_ITERS)
        lam = DAMPING
        if name == "auto-cg":
            like = op.space.flatten(op.space.detached())
            spec = spectra.estimate(op.matvec, like, steps=60, tol=1e-3, probes=1)
            lam = out["auto_damping"] = spec.auto_damping()
            out.update(lanczos_products=spec.n_matvec, lambda_min=spec.lambda_min,
                       lambda_max=spec.lambda_max)  # fmt: skip
        return solvers.cg(op.matvec, g, lam, tol=RESIDUAL, max_iter=SOLVER_ITERS,
                          on_negative_curvature="stop")  # fmt: skip

    with PeakRSS() as mem:
        res = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    basis = -(-out.get("lanczos_products", 0) // 16) * 16  # auto damping's Lanczos basis,
    state = _vectors_mib(op.space, max(STATE_VECTORS[name], basis))  # freed before CG runs
    _record(benchmark, op, res, mem, state_mib=state, **out)
    op.release()


@pytest.mark.benchmark(group="solvers")
def test_solver_lanczos_eigenpairs(benchmark, minilm):
    op, g = _solver_op(minilm, "hessian")
    rank = 10

    def run():
        return LowRankInverse.from_operator(op.matvec, g, rank, steps=80, tol=1e-3)

    with PeakRSS() as mem:
        inv = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    t0 = time.perf_counter()
    inv.solve(g, DAMPING)
    solve_s = time.perf_counter() - t0
    chunks = -(-inv.info["steps"] // 16)  # the basis grows in blocks of 16 vectors
    _record(benchmark, op, None, mem, rank=rank, lanczos_steps=inv.info["steps"],
            state_mib=_vectors_mib(op.space, 16 * chunks),
            products_per_eigenpair=op.n_matvec / rank,
            seconds_per_eigenpair=benchmark.stats.stats.mean / rank, solve_seconds=solve_s,
            eigenvalues=inv.eigenvalues.tolist(), converged=inv.info["converged"])  # fmt: skip
    op.release()


@pytest.mark.benchmark(group="solvers")
def test_solver_ekfac(benchmark, minilm):
    model, batches, space = minilm
    obj = mftx.HFClassification()
    g, _ = mftx.Curvature(model, space, batches, obj).gradient(batches)

    def run():
        return ekfac.fit(model, space, batches, obj, fisher="sampled", seed=0)

    with PeakRSS() as mem:
        fitted = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    lam = spectra.auto_damping(0.0, float(fitted.eigenvalues().max()))
    t0 = time.perf_counter()
    x = fitted.solve(g, lam)
    solve_s = time.perf_counter() - t0
    factors = sum(b.QA.numel() + b.QS.numel() + b.lam.numel() for b in fitted.blocks) * 8
    benchmark.extra_info.update(
        {"fit_seconds": benchmark.stats.stats.mean, "solve_seconds": solve_s, "products": 0,
         "modules": len(fitted.blocks), "state_mib": factors / 2**20, "damping": lam,
         "finite": bool(torch.isfinite(x).all()), "peak_rss_extra_mib_run": mem.extra_mib}
    )  # fmt: skip


def table(path: str) -> str:
    """The ``solvers`` group of a benchmark JSON as a markdown table."""
    rows = ["| solver | products | seconds | residual reached | solver state | peak extra RSS |",
            "| :-- | --: | --: | --: | --: | --: |"]  # fmt: skip
    for b in json.load(open(path))["benchmarks"]:
        if b.get("group") != "solvers":
            continue
        e = b["extra_info"]
        res = e.get("relative_residual")
        rows.append(
            f"| {b.get('param') or b['name']} | {e.get('products')} | {b['stats']['mean']:.1f} | "
            f"{'—' if res is None else f'{res:.1e}'} | {e['state_mib']:.0f} MiB | "
            f"{e['peak_rss_extra_mib_run']:.0f} MiB |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1]))
