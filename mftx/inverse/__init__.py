"""Inverses: s = (C + λI)⁻¹ g for a curvature C, one solve for all parameters.

- `solvers`: iterative solves on a `Curvature` (CG, MINRES, LiSSA) and the dense
  ``explicit`` solve for tiny spaces; `SolveResult` records what each did.
- `lowrank`: `LowRankInverse`, V(Λ + λI)⁻¹Vᵀ from Lanczos eigenpairs (saved, reused).
- `ekfac`: the eigenvalue-corrected Kronecker-factored Fisher, a closed form.

May import: `mftx.curvature`, `mftx.core`, `mftx.ops`, `mftx.fileio`, `mftx.errors`.
"""

from .lowrank import LowRankInverse
from .solvers import SOLVERS, SolveResult

__all__ = ["SOLVERS", "LowRankInverse", "SolveResult"]
