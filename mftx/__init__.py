"""mftx: mask fine-tuning of transformer classifiers.

Data flows one way: model + data → `score` → `Scores.candidates` / `flagged`
(`mftx.ops`) → masks (`mftx.ops.mask_` / `restore_`) → evaluation → report.
"""

from . import ops
from ._version import __version__
from .errors import NegativeCurvatureError, NonFiniteError, SolverDivergedError
from .hvp import Curvature
from .masking import MaskStack, masked
from .objective import HFClassification, Objective, batch_size
from .ops import Candidates
from .params import DEFAULT_EXCLUDE, ParamSpace, select_params
from .scores import METHODS, Scores
from .scoring import ScoreConfig, score
from .solvers import SolveResult

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "Candidates",
    "Curvature",
    "HFClassification",
    "MaskStack",
    "NegativeCurvatureError",
    "NonFiniteError",
    "Objective",
    "ParamSpace",
    "ScoreConfig",
    "Scores",
    "SolveResult",
    "SolverDivergedError",
    "__version__",
    "batch_size",
    "masked",
    "ops",
    "score",
    "select_params",
]
