"""``solver="lanczos"``: a low-rank inverse from the curvature's dominant eigenpairs.

s = V_r (Λ_r + λI)⁻¹ V_rᵀ g, with (Λ_r, V_r) the r eigenpairs of largest |λ|:
the definition of the Arnoldi influence of Schioppa et al. (2022) and dattri
(for a symmetric matrix, Arnoldi is Lanczos). The eigenpairs are Ritz pairs of
one fully reorthogonalised Lanczos run (`mftx.curvature.lanczos`) that stops once the r
wanted pairs have converged; directions outside their span are dropped.

The eigenpairs cost the curvature products; once computed they are saved
(`LowRankInverse.save`, safetensors + JSON, no pickle) and a new validation
gradient costs no further product: `LowRankInverse.load(path).solve(g, λ)`, or
``mftx.score(..., solver="lanczos", lowrank_file=path)``, which loads the file
when it exists and writes it otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from .. import fileio
from ..curvature.lanczos import lanczos, largest_magnitude, rademacher

__all__ = ["LowRankInverse"]

_FORMAT = "mftx.lowrank/1"


class LowRankInverse:
    """r eigenpairs (Λ, V) of a curvature over a parameter space, and their inverse."""

    def __init__(
        self,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        errors: Optional[torch.Tensor] = None,
        info: Optional[Dict[str, Any]] = None,
    ):
        if eigenvectors.dim() != 2 or eigenvalues.shape != (eigenvectors.shape[0],):
            raise ValueError(
                f"eigenvectors must be (r, n) rows with r eigenvalues, got {tuple(eigenvectors.shape)}"
                f" and {tuple(eigenvalues.shape)}"
            )
        self.eigenvalues = eigenvalues.to(torch.float64)
        self.eigenvectors = eigenvectors
        self.errors = errors if errors is not None else torch.zeros_like(self.eigenvalues)
        self.info = dict(info or {})

    @property
    def rank(self) -> int:
        return len(self.eigenvalues)

    @property
    def n(self) -> int:
        return self.eigenvectors.shape[1]

    @classmethod
    def from_operator(
        cls,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        like: torch.Tensor,
        rank: int,
        steps: int,
        tol: float = 1e-3,
        seed: int = 0,
        progress: bool = False,
        info: Optional[Dict[str, Any]] = None,
    ) -> LowRankInverse:
        """The `rank` Ritz pairs of largest |θ| from at most `steps` Lanczos steps.

        Lanczos stops early once those pairs' error bounds are <= tol·max|θ|.
        """
        n = like.numel()
        if rank < 1 or rank > n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
        if steps < rank:
            raise ValueError(f"lanczos_steps ({steps}) must be >= rank ({rank})")
        t0 = time.perf_counter()
        run = lanczos(
            matvec, rademacher(n, seed, like), steps, tol=tol, wanted=largest_magnitude(rank),
            progress=progress, desc="lanczos (low rank)",
        )  # fmt: skip
        theta, _, bounds = run.ritz()
        idx = largest_magnitude(rank)(theta)
        vectors = run.ritz_vectors(idx)
        info = dict(info or {})
        info.update(
            {"steps": run.steps, "n_matvec": run.n_matvec, "reason": run.reason,
             "converged": run.converged, "seconds": time.perf_counter() - t0, "seed": seed}
        )  # fmt: skip
        return cls(theta[idx], vectors, bounds[idx], info)

    def solve(self, g: torch.Tensor, damping: float) -> torch.Tensor:
        """V (Λ + λI)⁻¹ Vᵀ g: no curvature products."""
        if g.shape != (self.n,):
            raise ValueError(f"g must be a flat vector of {self.n} entries, got {tuple(g.shape)}")
        shifted = self.eigenvalues + damping
        tiny = 1e-12 * max(float(self.eigenvalues.abs().max()), 1e-300)
        if bool((shifted.abs() <= tiny).any()):
            j = int((shifted.abs() <= tiny).nonzero()[0, 0])
            raise ZeroDivisionError(
                f"eigenvalue {float(self.eigenvalues[j]):.6g} + damping {damping:g} is zero: "
                "Λ_r + λI is singular; change the damping"
            )
        V = self.eigenvectors.to(g.device)
        coef = (V @ g).to(torch.float64) / shifted.to(g.device)
        return V.T @ coef.to(g.dtype)

    def check_space(self, names, numels) -> None:
        """Refuse eigenpairs computed for another parameter space."""
        want = {"names": list(names), "numels": list(numels)}
        got = {"names": self.info.get("names"), "numels": self.info.get("numels")}
        if got != want:
            raise ValueError(
                "the saved eigenpairs belong to another parameter space "
                f"({len(got['names'] or [])} tensors, {self.n:,} entries; this one has "
                f"{len(want['names'])} tensors, {sum(want['numels']):,} entries)"
            )

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "eigenvalues": self.eigenvalues.contiguous().cpu(),
            "eigenvectors": self.eigenvectors.contiguous().cpu(),
            "errors": self.errors.to(torch.float64).contiguous().cpu(),
        }
        meta = {"format": _FORMAT, "info": self.info}
        return fileio.write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Union[str, Path]) -> LowRankInverse:
        t, meta = fileio.read_safetensors(
            path, _FORMAT, "low-rank inverse", ("eigenvalues", "eigenvectors", "errors")
        )
        return cls(t["eigenvalues"], t["eigenvectors"], t["errors"], meta["info"])

    def __repr__(self) -> str:
        return f"LowRankInverse(rank={self.rank}, n={self.n})"
