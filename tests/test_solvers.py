"""MINRES, the Lanczos engine, the low-rank inverse and solver validation, on dense float64 oracles."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mftx
from mftx.curvature import lanczos
from mftx.inverse import solvers
from mftx.inverse.lowrank import LowRankInverse


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def indefinite(n=40, seed=0, low=-2.0, high=5.0):
    """A symmetric matrix with eigenvalues spread over [low, high] (both signs) and a b."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    ev = torch.linspace(low, high, n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    return Q @ torch.diag(ev) @ Q.T, b, ev


def solve(A, b, lam):
    return torch.linalg.solve(A + lam * torch.eye(len(b), dtype=A.dtype), b)


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (float(), bool(), .item(): host syncs on a
    device) and records the ops between curvature products."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.segments = [[]]

    def mark(self):
        self.segments.append([])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        self.segments[-1].append(func.__name__)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- MINRES


@pytest.mark.parametrize("lam", [0.0, 0.013, 0.7])
def test_minres_solves_indefinite_systems(lam):
    A, b, ev = indefinite()
    assert ev.min() + lam < 0 < ev.max() + lam  # A + λI indefinite
    want = solve(A, b, lam)
    res = solvers.minres(lambda v: A @ v, b, lam, tol=1e-12, max_iter=500)
    assert res.converged and rel(res.x, want) < 1e-9
    assert res.true_residual <= 1e-11 and res.n_matvec == res.iterations + 1
    assert res.residuals[-1] <= 1e-12
    # The residual never grows (it is minimised over nested Krylov spaces) and the
    # recurrence's value is the true one.
    assert all(b2 <= b1 * (1 + 1e-12) for b1, b2 in zip(res.residuals, res.residuals[1:]))
    for k in (1, 5, 17):
        rk = solvers.minres(lambda v: A @ v, b, lam, tol=0.0, max_iter=k)
        assert rk.residuals[-1] == pytest.approx(rk.true_residual, rel=1e-9)
        assert rk.residuals[-1] == pytest.approx(res.residuals[k - 1], rel=1e-9)
        assert not rk.converged


def test_minres_agrees_with_cg_on_positive_definite_systems():
    A, b, _ = indefinite(low=0.1, high=5.0)
    cg = solvers.cg(lambda v: A @ v, b, 0.0, tol=1e-12, max_iter=500)
    mr = solvers.minres(lambda v: A @ v, b, 0.0, tol=1e-12, max_iter=500)
    assert rel(mr.x, cg.x) < 1e-10 and rel(mr.x, solve(A, b, 0.0)) < 1e-10


def test_minres_fixed_iterations_equal_tolerance_mode_and_read_nothing_inside():
    A, b, _ = indefinite()
    k = 23
    adaptive = solvers.minres(lambda v: A @ v, b, 0.05, tol=0.0, max_iter=k)
    mode = HostReads()

    def matvec(v):
        mode.mark()
        return A @ v

    with mode:
        fixed = solvers.minres(matvec, b, 0.05, max_iter=k, fixed_iterations=True)
    assert fixed.iterations == k and rel(fixed.x, adaptive.x) < 1e-12
    assert fixed.residuals == pytest.approx(adaptive.residuals, rel=1e-10)
    # No value is read back inside the loop: the only host reads come after it.
    inside = mode.segments[1:-1]
    assert len(inside) == k - 1
    # Every iteration runs the same ops (no data-dependent control flow) ...
    assert all(seg == inside[0] for seg in inside)
    assert "_local_scalar_dense" not in inside[0]
    # ... and the tolerance mode does read values (the count can fail).
    probe = HostReads()
    with probe:
        solvers.minres(lambda v: A @ v, b, 0.05, tol=0.0, max_iter=k)
    assert probe.reads >= 2 * k


def test_cg_fixed_iterations_read_nothing_inside():
    A, b, _ = indefinite(low=0.1)
    mode = HostReads()

    def matvec(v):
        mode.mark()
        return A @ v

    with mode:
        solvers.cg(matvec, b, 0.0, max_iter=9, fixed_iterations=True)
    inside = mode.segments[1:-1]
    assert len(inside) == 8 and all(seg == inside[0] for seg in inside)
    assert "_local_scalar_dense" not in inside[0]


@pytest.mark.parametrize("fixed", [False, True])
def test_minres_past_an_exact_solution_stays_put(fixed):
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # in a 2-dimensional invariant space
    res = solvers.minres(lambda v: A @ v, b, 0.0, tol=0.0, max_iter=8, fixed_iterations=fixed)
    assert torch.isfinite(res.x).all()
    assert rel(res.x, torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)) < 1e-14
    assert res.residuals[-1] < 1e-15
    if not fixed:
        assert res.converged and res.iterations == 2


def test_minres_zero_right_hand_side():
    A, _, _ = indefinite(n=5)
    for fixed in (False, True):
        res = solvers.minres(lambda v: A @ v, torch.zeros(5, dtype=torch.float64),
                             max_iter=3, fixed_iterations=fixed)  # fmt: skip
        assert torch.equal(res.x, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("fixed", [False, True])
def test_minres_on_a_singular_inconsistent_system_is_least_squares(fixed):
    A = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
    b = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # the last entry is unreachable
    res = solvers.minres(lambda v: A @ v, b, 0.0, tol=1e-12, max_iter=10, fixed_iterations=fixed)
    r = b - A @ res.x
    assert torch.isfinite(res.x).all() and float((A @ r).abs().max()) < 1e-14  # Aᵀr = 0
    assert float(r.norm() / b.norm()) == pytest.approx(1 / 6**0.5, rel=1e-12)
    assert res.residuals[-1] == pytest.approx(1 / 6**0.5, rel=1e-12) and not res.converged


@pytest.mark.parametrize("solver", [solvers.cg, solvers.minres])
def test_fixed_iterations_check_finiteness_once_after_the_loop(solver):
    A, b, _ = indefinite(low=0.1)

    def poisoned(v):
        out = A @ v
        out[3] = float("nan")
        return out

    with pytest.raises(mftx.NonFiniteError, match="NaN or inf after the fixed iterations"):
        solver(poisoned, b, 0.0, max_iter=4, fixed_iterations=True)


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf")])
def test_bad_tolerances_are_refused(tol):
    A, b, _ = indefinite(n=5, low=0.1)
    for solver in (solvers.cg, solvers.minres):
        with pytest.raises(ValueError, match="tol must be finite and >= 0"):
            solver(lambda v: A @ v, b, 0.0, tol=tol)
    with pytest.raises(ValueError, match="tol must be finite and >= 0"):
        solvers.lissa(lambda v: A @ v, b, 0.0, tol=tol)
    with pytest.raises(ValueError, match="max_iter"):
        solvers.minres(lambda v: A @ v, b, 0.0, max_iter=0)


def test_lissa_converged_is_honest():
    A, b, _ = indefinite(n=10, low=0.5, high=2.0)
    fixed_depth = solvers.lissa(lambda v: A @ v, b, 0.0, scale=3.0, depth=5, tol=0.0)
    assert not fixed_depth.converged and "not met" in fixed_depth.reason
    stopped = solvers.lissa(lambda v: A @ v, b, 0.0, scale=3.0, depth=2000, tol=1e-10)
    assert stopped.converged and stopped.iterations < 2000
    short = solvers.lissa(lambda v: A @ v, b, 0.0, scale=3.0, depth=3, tol=1e-10)
    assert not short.converged


# ---------------------------------------------------------------- Lanczos


def test_lanczos_extremes_and_orthogonal_basis():
    A, _, ev = indefinite(n=200, low=-1.7, high=4.2)
    start = lanczos.rademacher(200, 0, ev)
    run = lanczos.lanczos(lambda v: A @ v, start, 200, tol=1e-10)
    theta, _, bounds = run.ritz()
    assert run.converged and run.steps < 200
    assert abs(float(theta[0]) - float(ev[0])) < 1e-8
    assert abs(float(theta[-1]) - float(ev[-1])) < 1e-8
    Q = run.basis_rows()
    eye = torch.eye(run.steps, dtype=torch.float64)
    assert float((Q @ Q.T - eye).abs().max()) < 1e-12  # full reorthogonalisation
    T = Q @ A @ Q.T
    assert float((T - run.tridiagonal()).abs().max()) < 1e-12
    # Each bound is the Ritz pair's true residual norm.
    idx = torch.tensor([0, run.steps - 1])
    vecs = run.ritz_vectors(idx)
    for j, v in zip(idx, vecs):
        r = float(torch.linalg.vector_norm(A @ v - theta[j] * v))
        assert r == pytest.approx(float(bounds[j]), rel=1e-6, abs=1e-13)


def test_lanczos_stops_on_an_invariant_space():
    A = torch.diag(torch.tensor([3.0, 3.0, -1.0, -1.0], dtype=torch.float64))
    run = lanczos.lanczos(lambda v: A @ v, torch.ones(4, dtype=torch.float64), 4)
    assert run.steps == 2 and run.converged and "invariant" in run.reason
    assert run.ritz()[0].tolist() == pytest.approx([-1.0, 3.0], abs=1e-14)


# ---------------------------------------------------------------- low-rank inverse


def _top_r(A, r):
    e, V = torch.linalg.eigh(A)
    idx = torch.argsort(e.abs(), descending=True)[:r]
    return e[idx], V[:, idx]


def test_lowrank_inverse_is_the_dense_top_r_formula(tmp_path):
    A, b, ev = indefinite(n=60, low=-4.5, high=5.0)
    r, lam = 6, 0.3
    calls = {"n": 0}

    def matvec(v):
        calls["n"] += 1
        return A @ v

    inv = LowRankInverse.from_operator(matvec, b, r, steps=60, tol=1e-12, seed=1)
    e, V = _top_r(A, r)
    assert sorted(inv.eigenvalues.tolist()) == pytest.approx(sorted(e.tolist()), abs=1e-10)
    assert float(inv.eigenvalues.min()) == pytest.approx(-4.5, abs=1e-10)  # both ends
    want = V @ ((V.T @ b) / (e + lam))
    assert rel(inv.solve(b, lam), want) < 1e-9
    # Saved and loaded, a new right-hand side costs no product.
    path = inv.save(tmp_path / "eig.safetensors")
    back = LowRankInverse.load(path)
    n_before = calls["n"]
    b2 = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert rel(back.solve(b2, lam), V @ ((V.T @ b2) / (e + lam))) < 1e-9
    assert calls["n"] == n_before
    with pytest.raises(ZeroDivisionError, match="singular"):
        back.solve(b2, -float(e[0]))


def test_lowrank_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not mftx low-rank inverse"):
        LowRankInverse.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        LowRankInverse.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="lanczos_steps"):
        LowRankInverse.from_operator(lambda v: v, torch.ones(5), rank=4, steps=3)
