"""mftx: mask fine-tuning of transformer classifiers."""

from . import ops
from .ops import Candidates

__version__ = "0.1.0"

__all__ = ["Candidates", "__version__", "ops"]
