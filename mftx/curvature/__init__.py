"""Curvature: gradients and curvature-vector products, and what Lanczos reads from them.

- `hvp`: `Curvature`, the gradient and the Hessian or GGN product of a loss over
  batches (data-parallel under ``torch.distributed``), and the HVP batch choice.
- `memory`: what a retained autograd graph costs and whether caching fits.
- `lanczos`: the fully reorthogonalised Lanczos engine (Ritz pairs with bounds).
- `spectra`: `spectrum` / `Spectrum`: extreme eigenvalues, trace, density.
- `diagnose`: `diagnose` / `Diagnosis`: is C + λI well posed at a damping, before a solve.

May import: `mftx.core`, `mftx.ops`, `mftx.fileio`, `mftx.errors`.
"""

from .diagnose import Diagnosis, diagnose
from .hvp import CURVATURES, Curvature
from .spectra import Spectrum, spectrum

__all__ = ["CURVATURES", "Curvature", "Diagnosis", "Spectrum", "diagnose", "spectrum"]
