"""mftx: mask fine-tuning of transformer classifiers.

Data flows one way: model + data → `score` → `Scores.candidates` / `flagged`
(`mftx.ops`) → masks (`mftx.ops.mask_` / `restore_`) → evaluation → report.
"""

from . import ekfac, lanczos, lowrank, ops, spectra
from ._version import __version__
from .errors import NegativeCurvatureError, NonFiniteError, SolverDivergedError
from .hvp import Curvature
from .lowrank import LowRankInverse
from .masking import MaskStack, masked
from .objective import HFClassification, Objective, batch_size
from .ops import Candidates
from .params import DEFAULT_EXCLUDE, ParamSpace, select_params
from .scores import METHODS, Scores
from .scoring import ScoreConfig, score
from .solvers import SolveResult
from .spectra import Spectrum, spectrum

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "Candidates",
    "Curvature",
    "HFClassification",
    "LowRankInverse",
    "MaskStack",
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
    "ekfac",
    "lanczos",
    "lowrank",
    "masked",
    "ops",
    "score",
    "select_params",
    "spectra",
    "spectrum",
]
