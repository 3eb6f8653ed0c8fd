"""The Lanczos engine behind the spectrum, automatic damping and the low-rank inverse.

`lanczos(matvec, start, max_steps)` builds an orthonormal basis Q of the Krylov
space of a symmetric operator A and the tridiagonal T = Qᵀ A Q, one product per
step. The basis is kept and every new vector is reorthogonalised against all
previous ones (classical Gram–Schmidt, a second pass when the first one removed
much of it), so Ritz values do not repeat as spurious copies; the recurrence coefficients α, β and everything computed from
T are float64 whatever the operator's dtype. The start vector is the caller's
(seeded Rademacher in `rademacher`).

Ritz pairs (θ_j, Q s_j) come from the eigendecomposition T = S Θ Sᵀ; each has
the a-posteriori bound ‖A Q s_j − θ_j Q s_j‖ = β_m |S_{m,j}| (β_m the norm of
the last residual): some eigenvalue of A lies within it of θ_j. A run can stop
as soon as the Ritz values it is asked for have converged to a relative `tol`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import NonFiniteError

__all__ = ["LanczosRun", "extremes", "lanczos", "largest_magnitude", "rademacher"]

MatVec = Callable[[torch.Tensor], torch.Tensor]
#: Picks the indices of the wanted Ritz values from all of them (ascending θ).
Wanted = Callable[[torch.Tensor], torch.Tensor]

_CHUNK = 16  # basis rows per storage block (the basis grows without copies) ...
_CHUNK_BYTES = 2**30  # ... fewer when 16 rows would exceed this (1 row at least)


def _chunk_rows(n: int, dtype: torch.dtype) -> int:
    """Rows per basis block: 16, or as many as fit 1 GiB for long vectors, so the basis
    never holds more than one partly used block beyond what the steps need."""
    row = n * torch.finfo(dtype).bits // 8
    return max(1, min(_CHUNK, _CHUNK_BYTES // max(row, 1)))


def extremes(theta: torch.Tensor) -> torch.Tensor:
    """The smallest and the largest Ritz value."""
    return torch.tensor([0, len(theta) - 1]).unique()


def largest_magnitude(r: int) -> Wanted:
    """The r Ritz values of largest |θ| (all of them while there are fewer)."""

    def pick(theta: torch.Tensor) -> torch.Tensor:
        return torch.argsort(theta.abs(), descending=True, stable=True)[:r]

    return pick


def rademacher(n: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded ±1 vector of length n with `like`'s dtype and device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(like)


@dataclass
class LanczosRun:
    """The tridiagonal T = QᵀAQ of m steps, and the basis Q (m rows)."""

    alpha: torch.Tensor  #: (m,) float64, diagonal of T
    beta: torch.Tensor  #: (m,) float64; beta[j] couples rows j and j+1; beta[-1]: last residual
    chunks: List[torch.Tensor]  #: the basis, in blocks of rows
    start_norm: float
    n_matvec: int
    seconds: float
    converged: bool
    reason: str

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def tridiagonal(self) -> torch.Tensor:
        off = self.beta[:-1]
        return torch.diag(self.alpha) + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(θ ascending, S with Ritz vectors of T in columns, error bounds β_m |S_{m,j}|)."""
        return _ritz(self.alpha, self.beta)

    def basis_rows(self) -> torch.Tensor:
        return torch.cat(self.chunks)[: self.steps]

    def ritz_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """The Ritz vectors Q s_j for the indices `idx`, as rows (len(idx) × n)."""
        _, S, _ = self.ritz()
        out = None
        row = 0
        for chunk in self.chunks:
            k = min(len(chunk), self.steps - row)
            if k <= 0:
                break
            part = S[row : row + k, idx].T.to(chunk.dtype) @ chunk[:k]
            out = part if out is None else out + part
            row += k
        return out


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    m = len(alpha)
    T = torch.diag(alpha)
    if m > 1:
        T = T + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    bounds = beta[m - 1].abs() * S[m - 1].abs()
    return theta, S, bounds


def _project_out(w: torch.Tensor, chunks: List[torch.Tensor], rows: int) -> torch.Tensor:
    """w − Q (Qᵀ w) over the first `rows` basis rows."""
    done = 0
    for chunk in chunks:
        k = min(len(chunk), rows - done)
        if k <= 0:
            break
        q = chunk[:k]
        w = w - q.T @ (q @ w)
        done += k
    return w


def _norm64(w: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(w, dtype=torch.float64))


#: A second Gram–Schmidt pass runs when the first one removed more than this share of w's
#: norm (Daniel, Gragg, Kaufman & Stewart 1976: otherwise one pass has made w orthogonal
#: to the basis to working precision).
_DGKS = 2**-0.5


def lanczos(
    matvec: MatVec,
    start: torch.Tensor,
    max_steps: int,
    tol: float = 0.0,
    wanted: Wanted = extremes,
    progress: bool = False,
    desc: str = "lanczos",
    reorthogonalize: bool = True,
) -> LanczosRun:
    """Up to `max_steps` Lanczos steps on `matvec` from `start`, fully reorthogonalised.

    Stops early when every wanted Ritz value (``wanted(θ)``) has an error bound
    <= tol · max|θ| (tol = 0: never early), or when the Krylov space is invariant
    (β below rounding: the Ritz values are then eigenvalues of A).

    Each new vector is orthogonalised against the whole basis by classical
    Gram–Schmidt, a second time only when the first pass removed more than
    1 − 1/√2 of its norm (the DGKS criterion). ``reorthogonalize=False`` keeps no
    basis (plain three-term recurrence, no Ritz vectors): enough for quadrature
    (the nodes and weights of stochastic Lanczos quadrature) and the trace.
    """
    if max_steps < 1:
        raise ValueError(f"Lanczos needs at least one step, got {max_steps}")
    t0 = time.perf_counter()
    n = start.numel()
    max_steps = min(max_steps, n)
    s_norm = float(torch.linalg.vector_norm(start.to(torch.float64)))
    if not s_norm > 0:
        raise ValueError(f"the Lanczos start vector has norm {s_norm}")
    chunks: List[torch.Tensor] = []
    rows = _chunk_rows(n, start.dtype)
    alphas: List[float] = []
    betas: List[float] = []
    q = start / s_norm
    q_prev: Optional[torch.Tensor] = None
    eps = torch.finfo(start.dtype).eps
    reason, converged = f"{max_steps} steps", False
    bar = tqdm(range(max_steps), desc=desc, disable=not progress, leave=False)
    for j in bar:
        if reorthogonalize:
            if j % rows == 0:
                chunks.append(torch.empty(rows, n, dtype=start.dtype, device=start.device))
            chunks[-1][j % rows] = q
        w = matvec(q)
        a = float(torch.dot(q.to(torch.float64), w.to(torch.float64)))
        if a != a or abs(a) == float("inf"):
            raise NonFiniteError(f"Lanczos: qᵀAq is {a} at step {j}")
        w = w - a * q
        if q_prev is not None:
            w = w - betas[-1] * q_prev
        if reorthogonalize:
            before = _norm64(w)
            w = _project_out(w, chunks, j + 1)
            b = _norm64(w)
            if b < _DGKS * before:  # twice is enough (Giraud et al. 2005)
                w = _project_out(w, chunks, j + 1)
                b = _norm64(w)
        else:
            b = _norm64(w)
        alphas.append(a)
        betas.append(b)
        theta, _, bounds = _ritz(
            torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)
        )
        scale = float(theta.abs().max())
        idx = wanted(theta)
        worst = float(bounds[idx].max() / scale) if scale > 0 else 0.0
        bar.set_postfix(rel_err=f"{worst:.1e}")
        if b <= 10 * eps * max(scale, abs(a)) * (j + 1) ** 0.5:
            reason, converged = f"invariant Krylov space after {j + 1} steps", True
            break
        if tol > 0 and worst <= tol:
            reason, converged = (
                f"wanted Ritz values converged to {worst:.1e} <= tol {tol:g} after {j + 1} steps",
                True,
            )
            break
        q_prev, q = q, w / b
    bar.close()
    return LanczosRun(
        torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64),
        chunks, s_norm, len(alphas), time.perf_counter() - t0, converged, reason,
    )  # fmt: skip
