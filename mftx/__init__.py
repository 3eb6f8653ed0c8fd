"""mftx: mask fine-tuning of transformer classifiers.

Data flows one way: model + data → `score` → `Scores.candidates` / `flagged`
(`mftx.ops`) → masks (`mftx.ops.mask_` / `restore_`) → evaluation → report.

The package, by layer (each imports only the layers below it):

- this module: the public API, re-exported from the modules beside it
  (`scoring`, `scores`, `masking`, `evaluate`, `data`, `models`);
- `mftx.inverse`: CG, MINRES, LiSSA, the low-rank and EK-FAC inverses;
- `mftx.backends`: eager, torch.compile and torch_xla;
- `mftx.curvature`: gradients, curvature products, Lanczos, spectra;
- `mftx.core`: the analysed parameters and the loss;
- `mftx.ops` (compiled ops and their twins), `mftx.fileio` (files), `mftx.errors`.

The study (`mftx.study`: fine-tuning, analysis, protocols, report) and the
command line (`mftx.cli`) sit on top; nothing here imports them.
"""

from . import ops, sharded
from ._version import __version__
from .core.objective import HFClassification, Objective, batch_size
from .core.params import DEFAULT_EXCLUDE, ParamSpace, select_params
from .curvature import lanczos, memory, spectra
from .curvature.diagnose import Diagnosis, diagnose
from .curvature.hvp import Curvature
from .curvature.spectra import Spectrum, spectrum
from .errors import (
    ConvergenceError,
    ConvergenceWarning,
    MftxWarning,
    NegativeCurvatureError,
    NonFiniteError,
    SolverDivergedError,
)
from .inverse import ekfac, lowrank
from .inverse.lowrank import LowRankInverse
from .inverse.solvers import SolveResult
from .masking import MaskStack, masked
from .ops import Candidates
from .scores import METHODS, Scores
from .scoring import DEFAULT_SOLVER, ScoreConfig, score

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_SOLVER",
    "METHODS",
    "Candidates",
    "ConvergenceError",
    "ConvergenceWarning",
    "Curvature",
    "Diagnosis",
    "HFClassification",
    "LowRankInverse",
    "MaskStack",
    "MftxWarning",
    "NegativeCurvatureError",
    "NonFiniteError",
    "Objective",
    "ParamSpace",
    "ScoreConfig",
    "Scores",
    "SolveResult",
    "SolverDivergedError",
    "Spectrum",
    "__version__",
    "batch_size",
    "diagnose",
    "ekfac",
    "lanczos",
    "lowrank",
    "masked",
    "memory",
    "ops",
    "score",
    "select_params",
    "sharded",
    "spectra",
    "spectrum",
]
