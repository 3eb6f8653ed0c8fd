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

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import ops
from ..masking import fingerprint
from ..ops import Candidates
from ..ops.indexing import FlatIndex
from . import statistics
from .schema import Reader, register

__all__ = [
    "GroupFidelity",
    "GroupSample",
    "Subset",
    "draw",
    "measure",
    "summarize",
    "to_candidates",
]


@dataclass
class Subset:
    """A set of analysed entries (global flat indices, sorted) and where it came from."""

    origin: str  # "random", "top-<method>", "flagged-<method>"
    k: int
    index: torch.Tensor  # int64, sorted, distinct

    def key(self) -> str:
        """Origin, size and a digest of the indices: equal iff the same subset."""
        digest = hashlib.sha256(self.index.numpy().tobytes()).hexdigest()[:16]
        return f"{self.origin}/{self.k}/{digest}"


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


def _stream(seed: int, *parts: object) -> torch.Generator:
    """A generator of its own for each (seed, parts): draws of one kind never shift another's."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


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
    of that set (fewer entries than k: skipped). Each (k) and (k, method) draws
    from its own seeded stream, so asking for more subsets, more ks or more
    methods keeps every subset drawn before.
    """
    if n_random < 0 or n_flagged < 0:
        raise ValueError("subset counts must be >= 0")
    out: List[Subset] = []
    for k in sorted(set(int(k) for k in ks)):
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
        gen = _stream(seed, "random", k)
        out += [Subset("random", k, _sample(total, k, gen)) for _ in range(n_random)]
        for m, order in (ranked or {}).items():
            if len(order) >= k:
                out.append(Subset(f"top-{m}", k, order[:k].sort().values))
        for m, pool in (flagged or {}).items():
            if len(pool) >= k:
                gen = _stream(seed, "flagged", k, m)
                for _ in range(n_flagged):
                    pick = pool[_sample(len(pool), k, gen)].sort().values
                    out.append(Subset(f"flagged-{m}", k, pick))
    return out


@dataclass
class GroupSample:
    """One subset zeroed at once: the actual change of evaluation loss and the predictions.

    ``predicted[m]``: the sum of method m's per-parameter predictions over the
    subset; ``quadratic``: ½ θ_Sᵀ H θ_S (the second-order group term of the
    Taylor expansion), when it was computed for this subset.
    """

    origin: str
    k: int
    key: str
    actual: float
    predicted: Dict[str, float] = field(default_factory=dict)
    quadratic: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> GroupSample:
        pred = r.sub("predicted")
        return cls(
            r.str("origin"), r.int("k"), r.str("key"), r.float("actual"),
            {m: pred.float(m) for m in pred.obj}, r.opt_float("quadratic"),
        )  # fmt: skip


@register("groupfid", 1)
@dataclass
class GroupFidelity:
    """Predicted against actual loss changes of zeroing whole subsets.

    ``rows``: the dev rows the actual change was measured on; ``base_loss``:
    their loss unmasked; ``summary[method][group]``: statistics over the
    subsets of a group (``random k=<k>``, ``random`` over every k, ``all``).
    """

    rows: str
    base_loss: float
    samples: List[GroupSample]
    summary: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {
            "rows": self.rows, "base_loss": self.base_loss,
            "samples": [s.to_json() for s in self.samples], "summary": self.summary,
        }  # fmt: skip

    @classmethod
    def from_json(cls, r: Reader) -> GroupFidelity:
        return cls(
            r.str("rows"), r.float("base_loss"),
            [GroupSample.from_json(x) for x in r.each("samples")], r.dict("summary", {}),
        )  # fmt: skip


def measure(
    params: Sequence[torch.Tensor],
    subsets: Sequence[Subset],
    loss: Callable[[], float],
    predictions: Dict[str, torch.Tensor],
    quadratic: Optional[Callable[[Subset], Optional[float]]] = None,
    done: Optional[Dict[str, GroupSample]] = None,
    on_sample: Optional[Callable[[GroupSample], None]] = None,
    progress: bool = False,
    base: Optional[float] = None,
) -> List[GroupSample]:
    """Predicted and actual change of `loss()` for each subset.

    `predictions` maps a method to its flat per-parameter predicted change
    (float64, one entry per analysed parameter); a subset's prediction is their
    sum. `quadratic(subset)`, when given, returns a group term (or None) that is
    kept separately. The actual change zeroes the subset in `params`, evaluates
    `loss()` and restores the weights; they are checked bitwise unchanged at the
    end. Samples in `done` (by `Subset.key`) are reused; `base` is the unmasked
    loss when already known.
    """
    from tqdm.auto import tqdm

    layout = FlatIndex.of(params)
    for m, pred in predictions.items():
        if pred.shape != (layout.total,):
            raise ValueError(
                f"predictions[{m!r}] has shape {tuple(pred.shape)}, want ({layout.total},)"
            )
        if not bool(torch.isfinite(pred).all()):
            raise ValueError(f"predictions[{m!r}] contain NaN or infinity")
    done = done or {}
    before = fingerprint(params)
    base = loss() if base is None else base
    out = []
    for s in tqdm(subsets, desc="group fidelity", disable=not progress, leave=False):
        if s.key() in done:
            out.append(done[s.key()])
            continue
        cands = to_candidates(s.index, layout.numels)
        saved = ops.mask_(list(params), cands)
        try:
            actual = loss() - base
        finally:
            ops.restore_(list(params), cands, saved)
        sample = GroupSample(
            s.origin, s.k, s.key(), actual,
            {m: float(p[s.index].sum()) for m, p in predictions.items()},
            None if quadratic is None else quadratic(s),
        )  # fmt: skip
        out.append(sample)
        if on_sample is not None:
            on_sample(sample)
    if fingerprint(params) != before:
        raise RuntimeError("group fidelity: the weights did not come back bit for bit")
    return out


def _stats(pred: List[float], actual: List[float], resamples: int, seed: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"n": len(pred)}
    for name, fn in (("spearman", statistics.spearman), ("pearson", statistics.pearson)):
        value = fn(pred, actual) if len(pred) > 2 else math.nan
        out[name] = value
        if len(pred) > 2 and not math.isnan(value):
            lo, hi = statistics.bootstrap_interval(fn, pred, actual, resamples=resamples, seed=seed)
            out[f"{name}_interval"] = [lo, hi]
        else:
            out[f"{name}_interval"] = [math.nan, math.nan]
    out["mean_predicted"] = sum(pred) / len(pred) if pred else math.nan
    out["mean_actual"] = sum(actual) / len(actual) if actual else math.nan
    return out


def summarize(
    samples: Sequence[GroupSample], resamples: int = 1000, seed: int = 0
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per method and group of subsets: Spearman and Pearson (bootstrap 95 % intervals).

    Groups: ``random k=<k>`` (the random subsets of one size), ``random`` (all
    random subsets), ``all`` (every subset), and ``<origin> k=<k>`` for the
    method's own top-k and flagged subsets (means only: one or few subsets).
    Where the quadratic group term was computed, ``taylor`` also gets
    ``random+quadratic``: the full second-order Taylor expansion of zeroing the
    subset (first-order sum plus ½ θ_Sᵀ H θ_S) over those random subsets.
    """
    methods = sorted({m for s in samples for m in s.predicted})
    groups: Dict[str, List[GroupSample]] = {"all": list(samples)}
    groups["random"] = [s for s in samples if s.origin == "random"]
    for s in samples:
        groups.setdefault(f"{s.origin} k={s.k}", []).append(s)
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for m in methods:
        out[m] = {}
        for g, members in groups.items():
            if g.startswith(("top-", "flagged-")) and not g.split(" ")[0].endswith(f"-{m}"):
                continue
            pred = [s.predicted[m] for s in members]
            out[m][g] = _stats(pred, [s.actual for s in members], resamples, seed)
    quad = [s for s in groups["random"] if s.quadratic is not None]
    if quad and "taylor" in out:
        # The full second-order Taylor expansion of zeroing the subset.
        pred = [s.predicted["taylor"] + s.quadratic for s in quad]
        out["taylor"]["random+quadratic"] = _stats(pred, [s.actual for s in quad], resamples, seed)
    return out
