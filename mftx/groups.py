"""Group fidelity: does a method's prediction for a *set* of parameters match zeroing the set?

Zeroing one parameter is a tiny perturbation where the first-order term
dominates; masking removes sets of k = 100 … 100,000. For each k this module
draws subsets — uniformly random ones, the method's top-k, and random k-subsets
of its flagged set — predicts the change of evaluation loss as the sum of the
per-parameter predictions (optionally plus a quadratic group term), and measures
the actual change by zeroing the whole subset at once (restored bit for bit).
Across subsets, the rank correlation of predicted and actual is the parameter
analogue of the linear datamodeling score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import ops
from .indexing import FlatIndex
from .masking import fingerprint
from .ops import Candidates

__all__ = ["Subset", "draw", "measure", "to_candidates"]


@dataclass
class Subset:
    """A set of analysed entries (global flat indices, sorted) and where it came from."""

    origin: str  # "random", "top-<method>", "flagged-<method>"
    k: int
    index: torch.Tensor  # int64, sorted, distinct

    def key(self) -> str:
        return f"{self.origin}/{self.k}/{self.index[:4].tolist()}"


def to_candidates(index: torch.Tensor, numels: Sequence[int]) -> Candidates:
    """Global flat indices over tensors of `numels` entries as `Candidates` (value 0)."""
    layout = FlatIndex(numels)
    try:
        t, f = layout.split(index.to(torch.int64))
    except IndexError:
        raise ValueError(f"global indices must lie in [0, {layout.total})") from None
    return Candidates(t, f, torch.zeros(len(index), dtype=torch.float32))


def _sample(pool_size: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct positions out of pool_size, uniformly (without building a full permutation)."""
    if k > pool_size:
        raise ValueError(f"cannot draw {k} distinct entries out of {pool_size}")
    if 4 * k >= pool_size:
        return torch.randperm(pool_size, generator=gen)[:k].sort().values
    while True:
        draw = torch.unique(torch.randint(pool_size, (k + k // 8 + 16,), generator=gen))
        if len(draw) >= k:
            keep = torch.randperm(len(draw), generator=gen)[:k]
            return draw[keep].sort().values


def draw(
    total: int,
    ks: Sequence[int],
    n_random: int,
    seed: int,
    ranked: Optional[Dict[str, torch.Tensor]] = None,
    flagged: Optional[Dict[str, torch.Tensor]] = None,
    n_flagged: int = 10,
) -> List[Subset]:
    """The subsets of one group-fidelity run.

    For each k: `n_random` uniform subsets of the `total` entries; for each
    method in `ranked` (global indices, best first) its top-k; for each method
    in `flagged` (global indices of its flagged set) `n_flagged` random k-subsets
    of that set (fewer entries than k: skipped). Deterministic given `seed`.
    """
    if n_random < 0 or n_flagged < 0:
        raise ValueError("subset counts must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    out: List[Subset] = []
    for k in sorted(set(int(k) for k in ks)):
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
        out += [Subset("random", k, _sample(total, k, gen)) for _ in range(n_random)]
        for m, order in (ranked or {}).items():
            if len(order) >= k:
                out.append(Subset(f"top-{m}", k, order[:k].sort().values))
        for m, pool in (flagged or {}).items():
            if len(pool) >= k:
                for _ in range(n_flagged):
                    out.append(
                        Subset(f"flagged-{m}", k, pool[_sample(len(pool), k, gen)].sort().values)
                    )
    return out


def measure(
    params: Sequence[torch.Tensor],
    subsets: Sequence[Subset],
    loss: Callable[[], float],
    predictions: Dict[str, torch.Tensor],
    quadratic: Optional[Callable[[Subset], float]] = None,
    done: Optional[Dict[str, dict]] = None,
    on_record: Optional[Callable[[dict], None]] = None,
    progress: bool = False,
) -> List[dict]:
    """Predicted and actual change of `loss()` for each subset.

    `predictions` maps a method to its flat per-parameter predicted change
    (float64, one entry per analysed parameter); a subset's prediction is their
    sum. `quadratic(subset)`, when given, adds a group term (e.g. ½ θ_Sᵀ H θ_S)
    reported separately. The actual change zeroes the subset in `params`,
    evaluates `loss()` and restores the weights; they are checked bitwise
    unchanged at the end. Records in `done` (by `Subset.key`) are reused.
    """
    from tqdm.auto import tqdm

    numels = [p.numel() for p in params]
    total = sum(numels)
    for m, pred in predictions.items():
        if pred.shape != (total,):
            raise ValueError(f"predictions[{m!r}] has shape {tuple(pred.shape)}, want ({total},)")
        if not bool(torch.isfinite(pred).all()):
            raise ValueError(f"predictions[{m!r}] contain NaN or infinity")
    done = done or {}
    before = fingerprint(params)
    base = loss()
    records = []
    for s in tqdm(subsets, desc="group fidelity", disable=not progress, leave=False):
        if s.key() in done:
            records.append(done[s.key()])
            continue
        cands = to_candidates(s.index, numels)
        saved = ops.mask_(list(params), cands)
        try:
            actual = loss() - base
        finally:
            ops.restore_(list(params), cands, saved)
        rec = {
            "origin": s.origin, "k": s.k, "key": s.key(), "actual": actual,
            "predicted": {m: float(p[s.index].sum()) for m, p in predictions.items()},
        }  # fmt: skip
        if quadratic is not None:
            rec["quadratic"] = quadratic(s)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    if fingerprint(params) != before:
        raise RuntimeError("group fidelity: the weights did not come back bit for bit")
    return records
