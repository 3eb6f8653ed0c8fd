"""Cell formats of the held-out, group-fidelity, benchmark, location and seed tables.

Accuracies are fractions in the records and percentages in the tables; gains
(differences of accuracies) are shown in accuracy points. None and NaN show as
``n/a``; a cell with nothing to show (a method not run) as ``—``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from ..config import parse_method
from ..records import ScoresInfo
from .tables import MISSING, NA, fmt_accuracy, fmt_corr, fmt_count, fmt_points

__all__ = [
    "defined",
    "fmt_ci",
    "fmt_gain",
    "fmt_gain_ci",
    "fmt_k",
    "fmt_loss",
    "fmt_pm",
    "fmt_pm_gain",
    "fmt_positive",
    "fmt_ratio",
    "pad",
    "pick",
    "positive_share",
    "solve_label",
]


def defined(x: Any) -> bool:
    """Not None and not NaN."""
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt_gain(x: Optional[float]) -> str:
    """A difference of accuracies (fractions) in signed accuracy points: 0.0345 → ``+3.45``."""
    return fmt_points(100.0 * x if defined(x) else None)


def fmt_gain_ci(x: Optional[float], ci: Optional[Dict[str, Any]]) -> str:
    """A gain with its 95 % interval in accuracy points: ``+1.23 [-0.40, +2.86]`` (no interval:
    as `fmt_gain`); `ci` has ``lo`` and ``hi`` (fractions)."""
    if not defined(x) or not ci or not (defined(ci.get("lo")) and defined(ci.get("hi"))):
        return fmt_gain(x)
    return f"{fmt_gain(x)} [{fmt_gain(ci['lo'])}, {fmt_gain(ci['hi'])}]"


def fmt_k(k: Optional[int]) -> str:
    return fmt_count(k) if k is not None else MISSING


def fmt_pm(mean: Optional[float], sd: Optional[float]) -> str:
    """An accuracy with its spread: ``74.5 ± 1.2 %`` (no sd: as `fmt_accuracy`)."""
    if not defined(mean):
        return NA
    if not defined(sd):
        return fmt_accuracy(mean)
    return f"{100.0 * mean:.1f} ± {100.0 * sd:.1f} %"


def fmt_pm_gain(mean: Optional[float], sd: Optional[float]) -> str:
    """A gain with its spread in accuracy points: ``+1.23 ± 0.45``."""
    if not defined(mean):
        return NA
    if not defined(sd):
        return fmt_gain(mean)
    return f"{fmt_gain(mean)} ± {100.0 * sd:.2f}"


def fmt_ci(value: Optional[float], interval: Optional[Sequence[Optional[float]]]) -> str:
    """A correlation with its bootstrap interval: ``0.812 [0.701, 0.903]``."""
    if not defined(value):
        return NA
    if not interval or not all(defined(x) for x in interval):
        return fmt_corr(value)
    lo, hi = interval
    return f"{fmt_corr(value)} [{fmt_corr(lo)}, {fmt_corr(hi)}]"


def fmt_loss(x: Optional[float]) -> str:
    """A change of loss, signed, three significant digits: ``+1.23e-03``."""
    return f"{x:+.2e}" if defined(x) else NA


def fmt_positive(shares: Optional[List[float]]) -> str:
    """The predicted share of class 1 (``positive``) for two classes; every share otherwise."""
    if not shares:
        return NA
    if len(shares) == 2:
        return fmt_accuracy(shares[1])
    return " / ".join(fmt_accuracy(s) for s in shares)


def fmt_ratio(x: Optional[float]) -> str:
    """An enrichment (share of a set / share of the analysed entries): ``1.35×``."""
    return f"{x:.2f}×" if defined(x) else NA


def pad(cells: List[str], width: int) -> List[str]:
    """`cells` filled with ``—`` up to `width` columns."""
    return cells + [MISSING] * (width - len(cells))


def positive_share(shares: Optional[List[float]]) -> Optional[float]:
    """Class 1's predicted share for two classes (None otherwise): the CSV/JSON value."""
    return shares[1] if shares is not None and len(shares) == 2 else None


def pick(d: Optional[Dict[str, Any]], key: str) -> Any:
    """``d[key]``, None when `d` is None or lacks it."""
    return None if d is None else d.get(key)


#: How the solvers are named in the tables.
SOLVER_NAMES = {"minres": "MINRES", "cg": "CG", "lissa": "LiSSA", "lanczos": "Lanczos",
                "ekfac": "EK-FAC", "explicit": "explicit inverse"}  # fmt: skip


def solve_label(
    method: str, info: Optional[ScoresInfo], run_solver: str = "minres"
) -> Optional[str]:
    """What an influence method's solve computed, by name: ``MINRES, 40 it., rel. residual
    0.63, stopped short``, ``CG, 12 it., rel. residual 9.8e-07, converged``, ``EK-FAC,
    closed form``; None for methods without a solve or without a record."""
    v = parse_method(method)
    if v.method != "influence" or info is None:
        return None
    solver = v.solver or run_solver
    if solver in ("ekfac", "explicit"):
        return f"{SOLVER_NAMES[solver]}, closed form"
    if solver == "lanczos":  # a low-rank inverse: its residual is what its span misses
        steps = "" if info.iterations is None else f", {info.iterations} it."
        miss = info.relative_residual
        share = "" if miss is None else f", {miss:.0%} of ∇L_val outside its span"
        return f"Lanczos low rank{steps}{share}".replace("%", " %")
    parts = [SOLVER_NAMES.get(solver, solver)]
    if info.iterations is not None:
        parts.append(f"{info.iterations} it.")
    if info.relative_residual is not None:
        parts.append(f"rel. residual {info.relative_residual:.2g}")
    if info.converged is not None:
        parts.append("converged" if info.converged else "stopped short")
    return ", ".join(parts)
