"""`mftx.diagnose`: is (C + λI) s = ∇L_val well posed at the requested λ, before any solve?

A few Lanczos steps on the training loss's curvature C (Hessian or GGN) give Ritz
values θ₁ ≤ … ≤ θ_m with error bounds. Ritz values lie inside the spectrum, so
θ₁ + λ < 0 proves that C + λI is indefinite; otherwise definiteness is an
estimate (an eigenvalue below θ₁ may not have been found yet). From them:

- the verdict at λ: indefinite, positive definite (estimated), or singular in
  its extremes;
- what it means for the solvers: CG needs a positive-definite system (it stops
  at the first non-positive step); MINRES accepts an indefinite one but
  converges slowly where eigenvalues of C + λI lie near zero, and the solution
  itself is then dominated by those directions; EK-FAC inverts a
  positive-semidefinite Fisher approximation in closed form, so it is well
  posed for any λ > 0;
- a damping that makes the system positive definite (the ``damping="auto"`` rule,
  `mftx.curvature.spectra.auto_damping`), with the condition number there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

from torch import nn

from .spectra import Spectrum, spectrum

__all__ = ["Diagnosis", "diagnose"]

#: Above this estimated condition number of C + λI, iterative solves are called slow.
ILL_CONDITIONED = 1e4


@dataclass
class Diagnosis:
    """What a short Lanczos run says about (C + λI) s = ∇L_val; see `diagnose`."""

    curvature: str
    damping: float
    spectrum: Spectrum

    @property
    def shifted_min(self) -> float:
        """θ_min + λ: the smallest Ritz value of C + λI (an upper bound on its λ_min)."""
        return self.spectrum.lambda_min + self.damping

    @property
    def indefinite(self) -> bool:
        """True when C + λI is certainly indefinite (a Ritz value below −λ)."""
        return self.shifted_min < 0

    @property
    def definite(self) -> bool:
        """True when C + λI is estimated positive definite: θ_min minus its error
        bound stays above −λ (eigenvalues Lanczos has not found can still lie below)."""
        return self.spectrum.lambda_min - self.spectrum.lambda_min_error + self.damping > 0

    @property
    def condition(self) -> float:
        """Estimated condition number of C + λI: max |θ + λ| / min |θ + λ| over the Ritz
        values (a lower bound for the true one; inf when a shifted value is 0)."""
        shifted = [abs(t + self.damping) for t in self.spectrum.ritz_values]
        low = min(shifted)
        return math.inf if low == 0 else max(shifted) / low

    @property
    def recommended_damping(self) -> float:
        """The λ of ``damping="auto"``: C + λI positive definite by a margin."""
        return self.spectrum.auto_damping()

    @property
    def condition_at_recommended(self) -> float:
        lam = self.recommended_damping
        hi = self.spectrum.lambda_max + lam
        lo = self.spectrum.lambda_min - self.spectrum.lambda_min_error + lam
        return math.inf if lo <= 0 else hi / lo

    @property
    def verdict(self) -> str:
        if self.indefinite:
            return "indefinite"
        if self.definite:
            return "positive definite (estimated)"
        return "not definite within the estimate's error"

    def to_json(self) -> Dict[str, Any]:
        return {
            "curvature": self.curvature, "damping": self.damping, "verdict": self.verdict,
            "indefinite": self.indefinite, "definite": self.definite,
            "condition": self.condition, "recommended_damping": self.recommended_damping,
            "condition_at_recommended": self.condition_at_recommended,
            "spectrum": self.spectrum.to_json(),
        }  # fmt: skip

    def advice(self) -> List[str]:
        """What the verdict means for each solver, one sentence each."""
        lam, rec = self.damping, self.recommended_damping
        sym = "H" if self.curvature == "hessian" else "G"
        out = []
        if self.indefinite:
            out.append(
                f"CG: {sym} + {lam:g} I has a negative eigenvalue (≤ {self.shifted_min:.3g}), so "
                "CG stops at its first non-positive step (on_negative_curvature='raise' "
                "raises; 'stop' keeps an early iterate)."
            )
            out.append(
                "MINRES: accepts the indefinite system but converges slowly, and the exact "
                "solution is dominated by the directions whose eigenvalue of "
                f"{sym} + {lam:g} I is near zero (estimated condition number ≥ {self.condition:.3g})."
            )
        elif self.condition > ILL_CONDITIONED:
            out.append(
                f"CG and MINRES: {sym} + {lam:g} I is ill-conditioned (condition number ≥ "
                f"{self.condition:.3g}): expect many iterations."
            )
        else:
            out.append(
                f"CG and MINRES: {sym} + {lam:g} I looks positive definite with condition number "
                f"≈ {self.condition:.3g}: they should converge."
            )
        if not self.definite:
            out.append(
                f"damping={rec:.3g} (what damping='auto' picks) makes it positive definite by "
                f"the estimate, condition number ≈ {self.condition_at_recommended:.3g}; note "
                "that it solves another system than the one asked for."
            )
        out.append(
            "EK-FAC (solver='ekfac', the default) inverts a positive-semidefinite Kronecker-"
            "factored Fisher in closed form: well posed for any damping > 0, no products."
        )
        if self.curvature == "hessian" and self.indefinite:
            out.append(
                "curvature='ggn' (positive semi-definite) with solver='cg' is well posed for any "
                "damping > 0."
            )
        return out

    def report(self) -> str:
        """A plain-text account: the spectrum estimate, the verdict, the advice."""
        s = self.spectrum
        sym = "H" if self.curvature == "hessian" else "G"
        head = [
            f"curvature: {self.curvature} of the training loss over {s.n:,} parameters "
            f"({s.n_matvec} products, {s.seconds:.1f} s)",
            f"λ_min ≈ {s.lambda_min:.4g} ± {s.lambda_min_error:.2g}, "
            f"λ_max ≈ {s.lambda_max:.4g} ± {s.lambda_max_error:.2g} (Lanczos Ritz values)",
            f"{sym} + {self.damping:g} I: {self.verdict}",
        ]
        return "\n".join(head + [f"- {a}" for a in self.advice()])

    def __str__(self) -> str:
        return self.report()


def diagnose(
    model: nn.Module,
    train: Iterable,
    *,
    params=None,
    loss_fn: Optional[Callable] = None,
    curvature: str = "hessian",
    damping: float = 0.01,
    steps: int = 20,
    tol: float = 1e-2,
    hvp_batches: Optional[int] = None,
    hvp_mode: str = "rev-rev",
    seed: int = 0,
    progress: bool = True,
) -> Diagnosis:
    """Check (C + λI) s = ∇L_val before solving it: a Lanczos estimate of C's extreme
    eigenvalues (at most `steps` curvature products on the training batches, as
    `mftx.spectrum` with one probe), whether C + λI is indefinite at `damping`,
    what that means for CG, MINRES and EK-FAC, and which damping makes it positive
    definite. `train`, `params`, `loss_fn`, `hvp_batches` and `hvp_mode` as in
    `mftx.score`. Print the result (or its `report()`) for the account.
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    spec = spectrum(
        model, train, params=params, curvature=curvature, loss_fn=loss_fn, hvp_mode=hvp_mode,
        hvp_batches=hvp_batches, seed=seed, progress=progress, steps=steps, tol=tol, probes=1,
    )  # fmt: skip
    return Diagnosis(curvature, float(damping), spec)
