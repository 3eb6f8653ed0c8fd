"""What is analysed: the parameter space and the loss every engine computes on.

- `params`: which parameters of a model are analysed, in a fixed order (`ParamSpace`,
  `select_params`, the structural default selection).
- `objective`: what a batch costs (`Objective`, `HFClassification`, `default_loss`).

May import: `mftx.errors`, `mftx.ops` (and torch). Nothing else of mftx.
"""

from .objective import HFClassification, Objective, batch_size, default_loss
from .params import DEFAULT_EXCLUDE, ParamSpace, select_params

__all__ = [
    "DEFAULT_EXCLUDE",
    "HFClassification",
    "Objective",
    "ParamSpace",
    "batch_size",
    "default_loss",
    "select_params",
]
