"""Solvers for (A + λI) x = b, where A is only available through products A v.

- `cg`: conjugate gradients with a tolerance, or a fixed number of iterations
  with no data-dependent control flow (for compiled graphs); stops on
  non-positive curvature instead of returning garbage.
- `minres`: MINRES (Paige–Saunders) for symmetric systems that may be
  indefinite: the Lanczos tridiagonal reduced by Givens rotations; the same two
  modes as `cg`. It solves (H + λI) x = b as written whenever H + λI is
  nonsingular, where CG can only stop.
- `lissa`: the LiSSA recursion x ← b + (I − (A + λI)/scale) x, optionally on one
  sampled batch per step, averaged over repeats; detects divergence.
- `explicit`: the dense matrix and a direct solve, for small spaces; the oracle
  of the tests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import NegativeCurvatureError, NonFiniteError, SolverDivergedError
from ..ops._checks import finite_nonnegative

__all__ = ["SOLVERS", "SolveResult", "cg", "explicit", "lissa", "minres"]

log = logging.getLogger("mftx")

#: Every solver `mftx.score` accepts; `lanczos` (low-rank inverse) lives in `mftx.inverse.lowrank`,
#: `ekfac` (Kronecker-factored Fisher, no products) in `mftx.inverse.ekfac`.
SOLVERS = ("cg", "minres", "lissa", "explicit", "lanczos", "ekfac")

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: Largest parameter count `explicit` builds a dense matrix for.
MAX_EXPLICIT = 4096


@dataclass
class SolveResult:
    """A solution and how it was reached."""

    x: torch.Tensor
    solver: str
    iterations: int
    converged: bool
    reason: str
    residuals: List[float] = field(default_factory=list)
    n_matvec: int = 0
    seconds: float = 0.0
    negative_curvature: bool = False
    #: (iteration, pᵀ(A + λI)p) of the first non-positive step, if any.
    first_negative: Optional[Tuple[int, float]] = None
    #: ‖b − (A + λI)x‖ / ‖b‖ recomputed from x (one more product): `cg` and `minres` (unless
    #: asked not to). `residuals` are the recurrence's own values per iteration (CG's ‖r_k‖, MINRES'
    #: |φ̄_k|, over ‖b‖), which rounding can take below the true one.
    true_residual: Optional[float] = None

    @property
    def relative_residual(self) -> Optional[float]:
        """The true relative residual where it was recomputed, else the last of `residuals`;
        None where a solver has none (EK-FAC solves its own system)."""
        if self.true_residual is not None:
            return self.true_residual
        return self.residuals[-1] if self.residuals else None

    def stats(self) -> dict:
        d = asdict(self)
        d.pop("x")
        d["relative_residual"] = self.relative_residual
        return d


def _check_damping(damping: float) -> float:
    return finite_nonnegative("damping", damping)


def check_tol(tol: float) -> float:
    """A tolerance is finite and >= 0 (0: no early stop)."""
    return finite_nonnegative("tol", tol)


def check_max_iter(max_iter: int) -> int:
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return int(max_iter)


def damped(matvec: MatVec, damping: float) -> MatVec:
    """v -> A v + λ v."""
    return (lambda v: matvec(v) + damping * v) if damping else matvec


def _read_back(values: torch.Tensor, x: torch.Tensor, what: str) -> List[float]:
    """The 1-D device tensor `values`, read in one host sync, after checking that they
    and `x` are finite.

    The fixed-iteration loops read nothing back inside; this is their one check.
    """
    flag = torch.isfinite(x).all().to(values.dtype).reshape(1)
    out = torch.cat([values, flag]).cpu().tolist()
    if out[-1] != 1.0 or not all(math.isfinite(v) for v in out):
        raise NonFiniteError(
            f"{what}: NaN or inf after the fixed iterations (a curvature product or the "
            "right-hand side is not finite)"
        )
    return out[:-1]


def _nan_unless(flag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[0.] where `flag` holds, [nan] otherwise (for `_read_back`'s one finiteness check)."""
    return torch.where(flag, 0.0, float("nan")).to(dtype).reshape(1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


def _check_rhs(b: torch.Tensor, fixed_iterations: bool, what: str) -> None:
    if b.dim() not in (1, 2):
        raise ValueError(
            f"{what}: b must be a flat vector or a (k, n) matrix of k right-hand sides, "
            f"got shape {tuple(b.shape)}"
        )
    if b.dim() == 2 and fixed_iterations:
        raise ValueError(
            f"{what}: several right-hand sides need fixed_iterations=False (the fixed-iteration "
            "loop takes one)"
        )


def _lockstep(
    states: list, matvec: MatVec, damping: float, progress: bool, desc: str, max_iter: int
) -> int:
    """Steps every unfinished solve of `states` together: one product of the stacked vectors
    of those still running per iteration (a (k, n) matrix: `matvec` takes rows). Returns the
    number of products."""
    n_mv = 0
    bar = tqdm(range(max_iter), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        live = [s for s in states if not s.done]
        if not live:
            break
        V = torch.stack([s.vector() for s in live])
        AV = matvec(V)
        if damping:
            AV = AV + damping * V
        n_mv += 1
        for s, av in zip(live, AV):
            s.step(av)
        bar.set_postfix(running=sum(not s.done for s in states))
    bar.close()
    return n_mv


def _true_residuals(A: MatVec, b: torch.Tensor, x: torch.Tensor) -> List[float]:
    """‖b_i − A x_i‖ / ‖b_i‖ for the rows of (k, n) `b`, `x` (one stacked product)."""
    r = torch.linalg.vector_norm(b - A(x), dim=-1).to(torch.float64)
    bn = torch.linalg.vector_norm(b, dim=-1).to(torch.float64)
    return (r / torch.where(bn > 0, bn, torch.ones_like(bn))).cpu().tolist()


class _CG:
    """The state of one CG solve; `vector()` is the next vector to multiply, `step(Ap)`
    consumes its damped product (the arithmetic of the single-system loop)."""

    def __init__(self, b: torch.Tensor, tol: float):
        self.tol = tol
        self.x = torch.zeros_like(b)
        self.r = b.clone()
        self.p = self.r.clone()
        self.rs = torch.dot(self.r, self.r)
        self.bn = float(torch.sqrt(self.rs))
        self.residuals: List[float] = []
        self.reason, self.converged, self.done = "max_iter reached", False, False
        self.first: Optional[Tuple[int, float]] = None
        self.it = 0
        self.n_mv = 0
        if self.bn == 0.0:
            self.reason, self.converged, self.done = "b is zero", True, True
            self.residuals = [0.0]

    def vector(self) -> torch.Tensor:
        return self.p

    def step(self, Ap: torch.Tensor) -> None:
        it = self.it
        self.n_mv += 1
        pAp = float(torch.dot(self.p, Ap))
        if not math.isfinite(pAp):
            raise NonFiniteError(f"CG: pᵀAp is {pAp} at iteration {it}")
        if pAp <= 0:
            self.reason = f"non-positive curvature {pAp:.3e} at iteration {it}"
            self.first = (it, pAp)
            self.done = True
            return
        self.it += 1
        alpha = float(self.rs) / pAp
        self.x.add_(self.p, alpha=alpha)
        self.r.add_(Ap, alpha=-alpha)
        rs_new = torch.dot(self.r, self.r)
        rel = math.sqrt(float(rs_new)) / self.bn
        self.residuals.append(rel)
        log.debug("cg iteration %d: relative residual %.3e", it + 1, rel)
        if rel <= self.tol or rel == 0.0:  # zero: exact solution (even with tol = 0)
            self.reason = f"relative residual {rel:.2e} <= tol {self.tol:g}"
            self.converged = self.done = True
            return
        self.p.mul_(float(rs_new) / float(self.rs)).add_(self.r)
        self.rs = rs_new

    def result(self, t0: float, true_rel: Optional[float], n_extra: int) -> SolveResult:
        converged, reason = self.converged, self.reason
        if (
            true_rel is not None
            and converged
            and self.residuals
            and true_rel
            > max(self.tol, 10 * self.residuals[-1], 1e3 * torch.finfo(self.x.dtype).eps)
        ):
            converged = False
            reason += f", but the residual recomputed from x is {true_rel:.2e} (rounding)"
        log.info("cg: %d iterations, relative residual %.3e (%s)", self.it,
                 true_rel if true_rel is not None else (self.residuals or [1.0])[-1], reason)  # fmt: skip
        return SolveResult(
            self.x, "cg", self.it, converged, reason, self.residuals, self.n_mv + n_extra,
            time.perf_counter() - t0, self.first is not None, self.first, true_rel,
        )  # fmt: skip


def cg(
    matvec: MatVec,
    b: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    fixed_iterations: bool = False,
    on_negative_curvature: str = "raise",
    progress: bool = False,
    sync: Optional[Callable[[List[torch.Tensor]], None]] = None,
    true_residual: bool = True,
):
    """Conjugate gradients for (A + λI) x = b from x = 0.

    Stops when the recurrence's residual ‖r‖ <= tol·‖b‖ or after `max_iter`
    iterations. With `true_residual` (the default) the relative residual
    ‖b − (A + λI)x‖ / ‖b‖ is then recomputed from x (one more product) into
    `SolveResult.true_residual`, the number `relative_residual` reports, and
    `converged` is withdrawn when it is far above the recurrence's (rounding).
    `residuals` holds the recurrence's value per iteration.

    With `fixed_iterations=True` it runs exactly `max_iter` iterations without
    reading any value back to the host inside the loop (residuals are kept on
    the device and read once at the end; a step with non-positive curvature or a
    zero residual leaves the iterate unchanged). `sync`, if given, is called
    with the CG state tensors after every iteration (XLA cuts its graph there).

    Several right-hand sides: `b` of shape (k, n) solves the k systems together,
    each with its own recurrence (the arithmetic of its separate solve), sharing
    one product of the stacked vectors per iteration: `matvec` must then accept
    a (k', n) matrix of rows (`mftx.Curvature.matvec` does; k' <= k, the systems
    still running). Returns a list of k `SolveResult`.

    Non-positive curvature pᵀ(A + λI)p <= 0 raises `NegativeCurvatureError`, or,
    with ``on_negative_curvature="stop"``, returns the iterate reached so far with
    ``negative_curvature=True``.
    """
    damping = _check_damping(damping)
    max_iter, tol = check_max_iter(max_iter), check_tol(tol)
    if on_negative_curvature not in ("raise", "stop"):
        raise ValueError("on_negative_curvature must be 'raise' or 'stop'")
    _check_rhs(b, fixed_iterations, "cg")
    t0 = time.perf_counter()
    A = damped(matvec, damping)
    if fixed_iterations:
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = torch.dot(r, r)
        res = _cg_fixed(A, b, x, r, p, rs, torch.sqrt(rs), max_iter, progress, sync, t0)
        _on_negative(res.first_negative, on_negative_curvature, damping)
        return res
    if b.dim() == 2:
        states = [_CG(bi, tol) for bi in b]
        n_mv = _lockstep(states, matvec, damping, progress, f"cg ×{len(b)}", max_iter)
        for st in states:
            _on_negative(st.first, on_negative_curvature, damping)
        trues: List[Optional[float]] = [None] * len(b)
        if true_residual:
            trues = _true_residuals(A, b, torch.stack([st.x for st in states]))
        log.info("cg: %d right-hand sides, %d shared products", len(b), n_mv)
        return [st.result(t0, tr, int(true_residual)) for st, tr in zip(states, trues)]
    st = _CG(b, tol)
    if st.done:
        return SolveResult(st.x, "cg", 0, True, "b is zero", [0.0], 0, time.perf_counter() - t0,
                           true_residual=0.0 if true_residual else None)  # fmt: skip
    bar = tqdm(range(max_iter), desc="cg", disable=not progress, leave=False)
    for _ in bar:
        st.step(A(st.p))
        if st.residuals:
            bar.set_postfix(rel_res=f"{st.residuals[-1]:.2e}")
        if sync is not None and not st.first:
            sync([st.x, st.r, st.p, st.rs])
        if st.done:
            break
    bar.close()
    _on_negative(st.first, on_negative_curvature, damping)
    true_rel = None
    if true_residual:
        true_rel = float(_norm(b - A(st.x))) / st.bn
    return st.result(t0, true_rel, int(true_residual))


def _on_negative(
    first: Optional[Tuple[int, float]], on_negative_curvature: str, damping: float
) -> None:
    """Raise for a non-positive step (iteration, pᵀAp) unless "stop" has an iterate to keep."""
    if first is None:
        return
    it, pAp = first
    if on_negative_curvature == "raise" or it == 0:
        raise NegativeCurvatureError(it, pAp, damping, no_iterate=it == 0)


def _cg_fixed(A, b, x, r, p, rs, b_norm, max_iter, progress, sync, t0) -> SolveResult:
    res = []
    neg = torch.zeros((), dtype=torch.bool, device=b.device)
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    # The iteration count and curvature of the first non-positive step, on the device.
    count = torch.zeros((), dtype=torch.int64, device=b.device)
    first_it = torch.full((), -1, dtype=torch.int64, device=b.device)
    first_pAp = torch.zeros((), dtype=b.dtype, device=b.device)
    finite = torch.ones((), dtype=torch.bool, device=b.device)  # every product finite so far
    if sync is not None:  # materialise the start so that every iteration has the same graph
        sync([x, r, p, rs, b_norm, neg, zero, count, first_it, first_pAp, finite])
    for _ in tqdm(range(max_iter), desc="cg", disable=not progress, leave=False):
        Ap = A(p)
        pAp = torch.dot(p, Ap)
        finite = finite & torch.isfinite(pAp)
        live = rs > 0  # rs == 0: converged exactly, p is zero, nothing left to do
        new_neg = ~neg & live & ~(pAp > 0)
        first_it = torch.where(new_neg, count, first_it)
        first_pAp = torch.where(new_neg, pAp, first_pAp)
        neg = neg | new_neg
        count = count + 1
        # From the first non-positive step on, the iterate stays where it was ("stop").
        ok = ~neg & live
        alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)), zero)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = torch.dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), zero)
        p = torch.where(ok, r + beta * p, p)
        rs = rs_new
        res.append(torch.sqrt(rs_new))
        del Ap, pAp
        if sync is not None:
            sync([x, r, p, rs, neg, res[-1], count, first_it, first_pAp, finite])
    rel_dev = torch.stack(res) / torch.clamp(b_norm, min=torch.finfo(b.dtype).tiny)
    flags = torch.stack([neg.to(b.dtype), first_it.to(b.dtype), first_pAp])
    read = _read_back(torch.cat([rel_dev, flags, _nan_unless(finite, b.dtype)]), x, "cg")
    rel, (neg_read, it_read, pAp_read) = read[:-4], read[-4:-1]
    neg_seen = neg_read == 1.0
    reason = f"{max_iter} fixed iterations"
    first = None
    if neg_seen:
        first = (int(it_read), pAp_read)
        reason += f" (non-positive curvature {first[1]:.3e} at iteration {first[0]}; iterate kept)"
    return SolveResult(
        x, "cg", max_iter, not neg_seen, reason, rel, max_iter, time.perf_counter() - t0, neg_seen,
        first,
    )  # fmt: skip


class _Basis:
    """The Lanczos vectors of a reorthogonalised MINRES, kept in blocks of rows (as the
    Lanczos engine keeps them: the basis grows without copies, one partly used block)."""

    def __init__(self, like: torch.Tensor):
        from ..curvature.lanczos import _chunk_rows

        self.n = like.numel()
        self.rows = _chunk_rows(self.n, like.dtype)
        self.like = like
        self.chunks: List[torch.Tensor] = []
        self.count = 0

    def add(self, v: torch.Tensor) -> None:
        if self.count % self.rows == 0:
            self.chunks.append(torch.empty(self.rows, self.n, dtype=v.dtype, device=v.device))
        self.chunks[-1][self.count % self.rows] = v
        self.count += 1

    def project_out(self, w: torch.Tensor) -> torch.Tensor:
        from ..curvature.lanczos import _project_out

        return _project_out(w, self.chunks, self.count)


class _MINRES:
    """The state of one MINRES solve (see `minres`); `vector()` / `step(Av)` as in `_CG`."""

    def __init__(self, b: torch.Tensor, tol: float, reorthogonalize: bool):
        self.tol = tol
        self.bn = float(_norm(b))
        if not math.isfinite(self.bn):
            raise NonFiniteError(f"MINRES: the right-hand side has norm {self.bn}")
        self.x = torch.zeros_like(b)
        self.residuals: List[float] = []
        self.reason, self.converged, self.done = "max_iter reached", False, False
        self.it = 0  # iterations whose update of x is done
        self.n_mv = 0
        self.basis = _Basis(b) if reorthogonalize else None
        if self.bn == 0.0:
            self.reason, self.converged, self.done = "b is zero", True, True
            self.residuals = [0.0]
            return
        self.v_prev, self.v = torch.zeros_like(b), b / self.bn
        self.d_prev2, self.d_prev = torch.zeros_like(b), torch.zeros_like(b)
        self.beta = self.bn  # β_k: couples v_{k−1} and v_k
        self.c, self.s = -1.0, 0.0  # the previous rotation; (−1, 0) starts the recurrence
        self.dbar, self.eps = 0.0, 0.0  # δ̄_k, ε_k: column k of T after the two rotations
        self.phibar = self.bn
        self.tiny = 10 * torch.finfo(b.dtype).eps  # relative to ‖T‖: exact breakdown
        self.t_norm = 0.0
        if self.basis is not None:
            self.basis.add(self.v)
        self.last_p: Optional[torch.Tensor] = None

    def vector(self) -> torch.Tensor:
        return self.v

    def step(self, p: torch.Tensor) -> None:
        it = self.it
        self.n_mv += 1
        if it > 0:  # not updated in place: a matvec may return a view of its input
            p = p - self.beta * self.v_prev
        alpha = float(torch.dot(self.v, p))
        if not math.isfinite(alpha):
            raise NonFiniteError(f"MINRES: vᵀAv is {alpha} at iteration {it}")
        p = p - alpha * self.v
        if self.basis is not None:
            for _ in range(2):  # twice is enough (Giraud et al. 2005)
                p = self.basis.project_out(p)
        beta_next = float(_norm(p))
        beta = self.beta
        self.t_norm = max(
            self.t_norm, math.sqrt(alpha**2 + beta_next**2 + (beta**2 if it else 0.0))
        )
        c, s = self.c, self.s
        delta, gbar = c * self.dbar + s * alpha, s * self.dbar - c * alpha
        eps_k, self.eps, self.dbar = self.eps, s * beta_next, -c * beta_next
        gamma = math.hypot(gbar, beta_next)
        if gamma <= self.tiny * self.t_norm:  # T_k singular, the Krylov space invariant
            self.reason = f"singular system: exact breakdown at iteration {it}"
            self.done = True
            return
        self.it += 1
        c, s = self.c, self.s = gbar / gamma, beta_next / gamma
        tau, self.phibar = c * self.phibar, s * self.phibar
        d = (self.v - eps_k * self.d_prev2 - delta * self.d_prev) / gamma
        self.x.add_(d, alpha=tau)
        self.d_prev2, self.d_prev = self.d_prev, d
        rel = abs(self.phibar) / self.bn
        self.residuals.append(rel)
        self.last_p = p
        log.debug("minres iteration %d: relative residual %.3e", it + 1, rel)
        if rel <= self.tol:
            self.reason, self.converged = f"relative residual {rel:.2e} <= tol {self.tol:g}", True
            self.done = True
            return
        if beta_next <= self.tiny * self.t_norm:  # the Krylov space is invariant
            self.converged = rel <= 10 * self.tiny
            self.reason = f"invariant Krylov space at iteration {it}, relative residual {rel:.2e}"
            self.done = True
            return
        self.v_prev, self.v, self.beta = self.v, p / beta_next, beta_next
        if self.basis is not None:
            self.basis.add(self.v)

    def result(self, t0: float, true_rel: Optional[float], n_extra: int) -> SolveResult:
        converged, reason = self.converged, self.reason
        if (
            true_rel is not None
            and converged
            and self.residuals
            and true_rel > max(self.tol, 10 * self.residuals[-1], 10 * self.tiny)
        ):
            converged = False
            reason += f", but the residual recomputed from x is {true_rel:.2e} (rounding)"
        if self.basis is not None:
            reason += f" (reorthogonalised against {self.basis.count} basis vectors)"
            self.basis = None
        log.info("minres: %d iterations, relative residual %.3e (%s)", self.it,
                 true_rel if true_rel is not None else (self.residuals or [1.0])[-1], reason)  # fmt: skip
        return SolveResult(
            self.x, "minres", self.it, converged, reason, self.residuals, self.n_mv + n_extra,
            time.perf_counter() - t0, true_residual=true_rel,
        )  # fmt: skip


def minres(
    matvec: MatVec,
    b: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    fixed_iterations: bool = False,
    progress: bool = False,
    sync: Optional[Callable[[List[torch.Tensor]], None]] = None,
    true_residual: bool = True,
    reorthogonalize: bool = False,
):
    """MINRES (Paige & Saunders 1975) for (A + λI) x = b from x = 0, A symmetric.

    Each iteration takes one Lanczos step (one product), reduces the growing
    tridiagonal matrix to triangular form by one more Givens rotation and updates
    x, which minimises ‖b − (A + λI)x‖ over the Krylov space: the residual never
    grows, and indefinite or singular systems need no special care (for a
    singular inconsistent system it converges to a least-squares solution).

    Stops when the residual ‖r_k‖ = |φ̄_k| of the recurrence is <= tol·‖b‖ or
    after `max_iter` iterations; the scalar recurrence runs in float64. With
    `true_residual` (the default) the relative residual ‖b − (A + λI)x‖ / ‖b‖
    is recomputed from x at the end (one more product) into
    `SolveResult.true_residual`, so that `converged` is not claimed on the
    recurrence alone. With `fixed_iterations=True` it runs exactly `max_iter`
    iterations with no value read back to the host inside the loop (device
    scalars in b's dtype; a step after an exact breakdown leaves x unchanged),
    checks once afterwards that x is finite, and calls `sync` with the state
    tensors after every iteration.

    `reorthogonalize=True` keeps the Lanczos basis (one vector of b's size per
    iteration, in blocks as `mftx.curvature.lanczos` keeps it: memory grows with
    the iterations) and orthogonalises each new vector against all of it: in
    floating point plain MINRES loses orthogonality after a few dozen iterations
    and its residual stalls above what the Krylov space allows.

    Several right-hand sides: `b` of shape (k, n) as in `cg` (one shared product
    of the stacked vectors per iteration; a list of k `SolveResult`).
    """
    damping = _check_damping(damping)
    max_iter, tol = check_max_iter(max_iter), check_tol(tol)
    _check_rhs(b, fixed_iterations, "minres")
    if fixed_iterations and reorthogonalize:
        raise ValueError("minres: reorthogonalize=True needs fixed_iterations=False")
    t0 = time.perf_counter()
    A = damped(matvec, damping)
    if fixed_iterations:
        return _minres_fixed(A, b, tol, max_iter, progress, sync, t0)
    if b.dim() == 2:
        states = [_MINRES(bi, tol, reorthogonalize) for bi in b]
        n_mv = _lockstep(states, matvec, damping, progress, f"minres ×{len(b)}", max_iter)
        trues: List[Optional[float]] = [None] * len(b)
        if true_residual:
            trues = _true_residuals(A, b, torch.stack([st.x for st in states]))
        log.info("minres: %d right-hand sides, %d shared products", len(b), n_mv)
        return [st.result(t0, tr, int(true_residual)) for st, tr in zip(states, trues)]
    st = _MINRES(b, tol, reorthogonalize)
    if st.done:
        return SolveResult(st.x, "minres", 0, True, "b is zero", [0.0], 0, 0.0,
                           true_residual=0.0 if true_residual else None)  # fmt: skip
    bar = tqdm(range(max_iter), desc="minres", disable=not progress, leave=False)
    for _ in bar:
        st.step(A(st.v))
        if st.residuals:
            bar.set_postfix(rel_res=f"{st.residuals[-1]:.2e}")
        if sync is not None and st.last_p is not None:
            sync([st.x, st.v, st.last_p, st.d_prev, st.d_prev2])
        if st.done:
            break
    bar.close()
    true_rel = None
    if true_residual:
        true_rel = float(_norm(b - A(st.x))) / st.bn
    return st.result(t0, true_rel, int(true_residual))


def _minres_fixed(A, b, tol, max_iter, progress, sync, t0) -> SolveResult:
    """`minres` for exactly `max_iter` iterations; every branch is a `torch.where`."""
    dt = b.dtype
    zero = torch.zeros((), dtype=dt, device=b.device)
    one = torch.ones((), dtype=dt, device=b.device)
    bn = _norm(b)
    live0 = bn > 0
    x = torch.zeros_like(b)
    v_prev = torch.zeros_like(b)
    v = torch.where(live0, b / torch.where(live0, bn, one), zero)
    d_prev2, d_prev = torch.zeros_like(b), torch.zeros_like(b)
    # β multiplies v_prev = 0 on the first step; starting it at 0 keeps ‖b‖ out of ‖T‖.
    # Distinct tensors (no aliases: XLA would compile the first iteration's graph twice).
    beta, s, dbar, eps = (zero.clone() for _ in range(4))
    c, phibar = -one, bn
    t_norm = zero.clone()  # running estimate of ‖T‖, the scale of "exactly zero"
    tiny = 10 * torch.finfo(dt).eps
    finite = torch.ones((), dtype=torch.bool, device=b.device)  # every product finite so far
    res = []
    if sync is not None:  # materialise the start so that every iteration has the same graph
        sync([x, v, v_prev, d_prev, d_prev2, beta, c, s, dbar, eps, phibar, t_norm, finite])
    for _ in tqdm(range(max_iter), desc="minres", disable=not progress, leave=False):
        p = A(v) - beta * v_prev
        alpha = torch.dot(v, p)
        p = p - alpha * v
        beta_next = _norm(p)
        finite = finite & torch.isfinite(alpha) & torch.isfinite(beta_next)
        t_norm = torch.maximum(t_norm, torch.sqrt(alpha * alpha + beta_next**2 + beta * beta))
        delta, gbar = c * dbar + s * alpha, s * dbar - c * alpha
        eps_k, eps, dbar = eps, s * beta_next, -c * beta_next
        gamma = torch.sqrt(gbar * gbar + beta_next * beta_next)
        live = gamma > tiny * t_norm  # not after an exact breakdown (v = 0 from then on)
        g_safe = torch.where(live, gamma, one)
        c = torch.where(live, gbar / g_safe, zero)
        s = torch.where(live, beta_next / g_safe, one)  # (0, 1): φ̄ and x stay as they are
        tau, phibar = c * phibar, s * phibar
        d = torch.where(live, (v - eps_k * d_prev2 - delta * d_prev) / g_safe, zero)
        x = x + tau * d
        d_prev2, d_prev = d_prev, d
        nonzero = beta_next > tiny * t_norm
        v_prev, v = v, torch.where(nonzero, p / torch.where(nonzero, beta_next, one), zero)
        beta = torch.where(nonzero, beta_next, zero)
        res.append(phibar.abs())
        del p, alpha, gamma, g_safe, d, delta, gbar, eps_k, live, nonzero
        if sync is not None:
            sync([x, v, v_prev, d_prev, d_prev2, beta, c, s, dbar, eps, phibar, t_norm, finite,
                  res[-1]])  # fmt: skip
    rel_dev = torch.stack(res) / torch.clamp(bn, min=torch.finfo(dt).tiny)
    rel = _read_back(torch.cat([rel_dev, _nan_unless(finite, dt)]), x, "minres")[:-1]
    converged = rel[-1] <= tol
    reason = f"{max_iter} fixed iterations, relative residual {rel[-1]:.2e}" + (
        f" <= tol {tol:g}" if converged else f" > tol {tol:g}"
    )
    return SolveResult(
        x, "minres", max_iter, converged, reason, rel, max_iter, time.perf_counter() - t0
    )


def lissa(
    matvec: Callable[..., torch.Tensor],
    b: torch.Tensor,
    damping: float = 0.0,
    scale: float = 10.0,
    depth: int = 100,
    repeats: int = 1,
    tol: float = 0.0,
    n_batches: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
    divergence: float = 1e4,
) -> SolveResult:
    """LiSSA: x_{j+1} = b + (I − (A + λI)/scale) x_j, answer x/scale.

    `scale` must exceed the largest eigenvalue of A + λI, and A + λI must be
    positive definite; then after `depth` steps the relative error is at most
    (1 − μ/scale)^depth (μ the smallest eigenvalue of A + λI). With `n_batches`
    set, each step uses one batch drawn at random (``matvec(v, [i])``): a
    stochastic estimate, averaged over `repeats` runs. `tol` > 0 stops a run
    when the update is below tol·‖x‖; `converged` says whether every run met
    that test (with tol = 0 only an update of exactly zero does: a run of fixed
    depth has not shown convergence). A run whose iterate grows beyond
    `divergence`·depth·‖b‖ or stops being finite raises `SolverDivergedError`.
    """
    damping = _check_damping(damping)
    tol = check_tol(tol)
    if not math.isfinite(scale) or scale <= 0 or depth < 1 or repeats < 1:
        raise ValueError("lissa needs a finite scale > 0, depth >= 1 and repeats >= 1")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    b_norm = float(_norm(b))
    total = torch.zeros_like(b)
    n_mv, iters, residuals = 0, 0, []
    converged = True
    limit = divergence * depth * max(b_norm, 1e-30)
    for rep in range(repeats):
        x = b.clone()
        bar = tqdm(
            range(depth), desc=f"lissa {rep + 1}/{repeats}", disable=not progress, leave=False
        )
        run_converged = False
        for j in bar:
            if n_batches:
                i = int(torch.randint(n_batches, (1,), generator=gen))
                Ax = matvec(x, [i])
            else:
                Ax = matvec(x)
            n_mv += 1
            x_new = b + x - (Ax + damping * x) / scale
            step = float(_norm(x_new - x))
            xn = float(_norm(x_new))
            if not math.isfinite(xn) or xn > limit:
                raise SolverDivergedError(
                    f"LiSSA diverged at step {j} of repeat {rep}: ‖x‖ = {xn:.3e}. Raise `scale` "
                    "above the largest eigenvalue of H + λI, or raise the damping."
                )
            x = x_new
            iters += 1
            residuals.append(step / max(xn, 1e-30))
            if step <= tol * xn:  # with tol = 0: only an exact fixed point
                run_converged = True
                break
        bar.close()
        converged = converged and run_converged
        total += x / scale
    x = total / repeats
    reason = f"{repeats} repeat(s) of depth <= {depth}" + (
        f", update <= tol {tol:g}·‖x‖" if converged else ", stopping test not met"
    )
    return SolveResult(
        x, "lissa", iters, converged, reason, residuals, n_mv, time.perf_counter() - t0
    )


def dense_matrix(matvec: MatVec, n: int, like: torch.Tensor) -> torch.Tensor:
    """A as a dense n×n matrix, one product per column."""
    cols = []
    e = torch.zeros(n, dtype=like.dtype, device=like.device)
    for j in range(n):
        e.zero_()
        e[j] = 1
        cols.append(matvec(e).clone())
    return torch.stack(cols, dim=1)


def explicit(
    matvec: MatVec, b: torch.Tensor, damping: float = 0.0, max_size: int = MAX_EXPLICIT
) -> SolveResult:
    """Build A densely (n products) and solve (A + λI) x = b with `torch.linalg.solve`."""
    damping = _check_damping(damping)
    n = b.numel()
    check_explicit_size(n, max_size)
    t0 = time.perf_counter()
    A = dense_matrix(matvec, n, b)
    A = 0.5 * (A + A.T) + damping * torch.eye(n, dtype=A.dtype, device=A.device)
    x = torch.linalg.solve(A, b)
    rel = float(_norm(A @ x - b) / _norm(b)) if float(_norm(b)) > 0 else 0.0
    return SolveResult(x, "explicit", 1, True, "direct solve", [rel], n, time.perf_counter() - t0)


def check_explicit_size(n: int, max_size: int = MAX_EXPLICIT) -> None:
    if n > max_size:
        raise ValueError(
            f"solver='explicit' builds a dense {n}×{n} matrix ({n} products); it is limited to "
            f"{max_size} parameters. Use solver='cg' or restrict the parameters "
            "(select_params(include=...))."
        )
