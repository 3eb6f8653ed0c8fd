"""Would more iterations change the answer? One influence solve at several truncations.

An analysis may run the same influence method at several iteration caps (MINRES or
CG: method labels ``influence-minres-it40``, ``-it100``, ``-it200``) or ranks (the
Lanczos low-rank inverse: ``influence-lanczos-r20``, ``-r100``). Such labels form a
*family*: every setting equal but the one count. For each family with two or more
members, ``sensitivity-<family>.json`` records, between each member and the next
larger setting, the share of the top-k entries they have in common and the relative
change of the scores ‖I_next − I‖ / ‖I_next‖. The report adds each member's solve
(iterations, residual) and held-out gain from their own records, so one table says
whether a longer solve would move any answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..ops.indexing import FlatIndex
from ..scores import Scores
from .config import ITERATIVE_SOLVERS, AnalyzeConfig, count_token, parse_method
from .schema import Reader, register

__all__ = ["Sensitivity", "compare", "families"]


def _strip(label: str) -> str:
    """The label without its it<N> / r<N> token."""
    keep = [t for i, t in enumerate(label.split("-")) if i == 0 or count_token(t) is None]
    return "-".join(keep)


def families(
    labels: Sequence[str], cfg: AnalyzeConfig
) -> Dict[str, Tuple[str, List[Tuple[int, str]]]]:
    """Influence labels that differ only in their iteration cap or rank, as resolved with
    the run's settings: family name -> (parameter, [(setting, label), …] by setting).
    Only families with two or more distinct settings."""
    found: Dict[tuple, List[Tuple[int, str]]] = {}
    for label in labels:
        v = parse_method(label)
        if v.method != "influence":
            continue
        solver = v.solver or cfg.solver
        if solver in ITERATIVE_SOLVERS:
            parameter, setting = "max_iter", v.max_iter or cfg.max_iter
        elif solver == "lanczos":
            parameter, setting = "rank", v.rank or cfg.rank
        else:
            continue
        key = (parameter, v.curvature or cfg.curvature, solver, str(v.damping or cfg.damping))
        found.setdefault(key, []).append((setting, label))
    out = {}
    for (parameter, *_), members in found.items():
        if len({s for s, _ in members}) < 2:
            continue
        members.sort()
        name = min((_strip(label) for _, label in members), key=lambda x: (len(x), x))
        out[name] = (parameter, members)
    return out


def _global(s: Scores, k: int) -> torch.Tensor:
    c = s.candidates(k)
    return FlatIndex.of(s.tensors()).to_global(c.tensor_index, c.flat_index)


def compare(a: Scores, b: Scores, ks: Sequence[int]) -> Dict[str, Any]:
    """Top-k overlap (share of k) for each k and ‖I_b − I_a‖ / ‖I_b‖ (float64)."""
    if a.names != b.names:
        raise ValueError("the two score sets cover different parameters")
    total = sum(t.numel() for t in a.tensors())
    overlap = {}
    for k in ks:
        if k > total:
            continue
        overlap[str(k)] = float(torch.isin(_global(a, k), _global(b, k)).sum()) / k
    diff = sum(
        float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a.tensors(), b.tensors())
    )
    norm = sum(float((y.double() ** 2).sum()) for y in b.tensors())
    return {"overlap": overlap,
            "relative_change": math.sqrt(diff / norm) if norm > 0 else math.nan}  # fmt: skip


@register("sensitivity", 1, per_method=True)
@dataclass
class Sensitivity:
    """One family of truncations: ``members`` [{label, setting}] by setting, ``pairs``
    [{from, to, overlap: {k: share}, relative_change}] between neighbours."""

    family: str
    parameter: str
    members: List[Dict[str, Any]]
    pairs: List[Dict[str, Any]]

    def to_json(self) -> Dict[str, Any]:
        return {"family": self.family, "parameter": self.parameter, "members": self.members,
                "pairs": self.pairs}  # fmt: skip

    @classmethod
    def from_json(cls, r: Reader) -> Sensitivity:
        return cls(r.str("family"), r.str("parameter"), r.list("members"), r.list("pairs"))
