"""Group fidelity: does a method's prediction for a *set* of parameters match zeroing the set?

Zeroing one parameter is a tiny perturbation where the first-order term
dominates; masking removes sets of k = 100 … 100,000. For each k this module
draws subsets — uniformly random ones, the method's top-k, and random k-subsets
of its flagged set — predicts the change of evaluation loss as the sum of the
per-parameter predictions (optionally plus a quadratic group term), and measures
the actual change by zeroing the whole subset at once (restored bit for bit).
Across subsets, the rank correlation of predicted and actual is the parameter
analogue of the linear datamodeling score.

With the held-out split the actual change is measured on both halves of the dev
rows (and on all of them), and predictions come from each score set (all rows,
half A, half B), so `summarize` reads fidelity per subset size in five
*directions*: in-sample (``all``: all-rows scores against all rows; ``A→A``,
``B→B``) and across halves (``A→B``, ``B→A``: one half's scores against the
other half's loss), each with a bootstrap interval. In-sample fidelity measures
how well the method approximates the change it claims to predict; across halves
adds whether that change transfers to rows that did not choose.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..masking import fingerprint
from ..ops import Candidates
from ..ops.indexing import FlatIndex
from . import statistics
from .schema import Reader, register

__all__ = [
    "DIRECTIONS",
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

    ``actual``: the change on the evaluation rows (half B); ``predicted[m]``: the
    sum of method m's per-parameter predictions over the subset, from its
    selection-half (A) scores; ``quadratic``: ½ θ_Sᵀ H θ_S (the second-order
    group term of the Taylor expansion), when it was computed for this subset.
    Measured on both halves (records since group fidelity had directions):
    ``actual_rows`` the change on ``A``, ``B`` and ``all`` rows, and
    ``predicted_sets[s][m]`` the predictions from score set ``s`` (``all``, ``B``).
    """

    origin: str
    k: int
    key: str
    actual: float
    predicted: Dict[str, float] = field(default_factory=dict)
    quadratic: Optional[float] = None
    actual_rows: Dict[str, float] = field(default_factory=dict)
    predicted_sets: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("actual_rows", "predicted_sets"):  # measured on one half: as it was
            if not out[k]:
                del out[k]
        return out

    @classmethod
    def from_json(cls, r: Reader) -> GroupSample:
        pred = r.sub("predicted")
        rows = r.sub("actual_rows") if r.has("actual_rows") else None
        sets = r.mapping("predicted_sets") if r.has("predicted_sets") else {}
        return cls(
            r.str("origin"), r.int("k"), r.str("key"), r.float("actual"),
            {m: pred.float(m) for m in pred.obj}, r.opt_float("quadratic"),
            {} if rows is None else {n: rows.float(n) for n in rows.obj},
            {n: {m: x.float(m) for m in x.obj} for n, x in sets.items()},
        )  # fmt: skip

    def pair(self, method: str, direction: str) -> Optional[Tuple[float, float]]:
        """(predicted, actual) of `method` in `direction` (see `DIRECTIONS`), or None
        when this sample was not measured or predicted that way."""
        scores, rows = DIRECTIONS[direction]
        if rows not in self.actual_rows and not (rows == "B" and direction == "A→B"):
            return None
        actual = self.actual if direction == "A→B" else self.actual_rows[rows]
        pred = self.predicted if scores == "A" else self.predicted_sets.get(scores, {})
        if method not in pred:
            return None
        return pred[method], actual


#: Direction -> (the score set that predicts, the rows whose loss change is measured).
DIRECTIONS: Dict[str, Tuple[str, str]] = {
    "all": ("all", "all"), "A→A": ("A", "A"), "B→B": ("B", "B"),
    "A→B": ("A", "B"), "B→A": ("B", "A"),
}  # fmt: skip


@register("groupfid", 1)
@dataclass
class GroupFidelity:
    """Predicted against actual loss changes of zeroing whole subsets.

    ``rows``: the dev rows the actual change was measured on (``B``, or ``A+B``:
    both halves, each sample's ``actual`` being B's); ``base_loss``: B's loss
    unmasked (``base_losses``: every row set's); ``summary[method][group]``:
    statistics over the subsets of a group (``random k=<k>``, ``random`` over
    every k, ``all``, and per direction, see `summarize`).
    """

    rows: str
    base_loss: float
    samples: List[GroupSample]
    summary: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)
    base_losses: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        out = {
            "rows": self.rows, "base_loss": self.base_loss, "base_losses": self.base_losses,
            "samples": [s.to_json() for s in self.samples], "summary": self.summary,
        }  # fmt: skip
        if not self.base_losses:
            del out["base_losses"]
        return out

    @classmethod
    def from_json(cls, r: Reader) -> GroupFidelity:
        return cls(
            r.str("rows"), r.float("base_loss"),
            [GroupSample.from_json(x) for x in r.each("samples")], r.dict("summary", {}),
            {n: float(v) for n, v in r.dict("base_losses", {}).items()},
        )  # fmt: skip


def measure(
    params: Sequence[torch.Tensor],
    subsets: Sequence[Subset],
    loss: Callable[[], Union[float, Mapping[str, float]]],
    predictions: Dict[str, torch.Tensor],
    quadratic: Optional[Callable[[Subset], Optional[float]]] = None,
    done: Optional[Dict[str, GroupSample]] = None,
    on_sample: Optional[Callable[[GroupSample], None]] = None,
    progress: bool = False,
    base: Union[float, Mapping[str, float], None] = None,
    primary: str = "B",
) -> List[GroupSample]:
    """Predicted and actual change of `loss()` for each subset.

    `loss()` returns one loss, or losses by row set (e.g. ``A``, ``B``, ``all``):
    then every change is kept in ``actual_rows`` and ``actual`` is the `primary` one.

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
    if isinstance(base, Mapping) and primary not in base:
        raise ValueError(f"loss() names the row sets {sorted(base)}, not {primary!r}")
    out = []
    for s in tqdm(subsets, desc="group fidelity", disable=not progress, leave=False):
        if s.key() in done:
            out.append(done[s.key()])
            continue
        cands = to_candidates(s.index, layout.numels)
        saved = ops.mask_(list(params), cands)
        try:
            now = loss()
        finally:
            ops.restore_(list(params), cands, saved)
        rows = _changes(now, base)
        sample = GroupSample(
            s.origin, s.k, s.key(), rows[primary] if rows else float(now) - float(base),
            {m: float(p[s.index].sum()) for m, p in predictions.items()},
            None if quadratic is None else quadratic(s), rows,
        )  # fmt: skip
        out.append(sample)
        if on_sample is not None:
            on_sample(sample)
    if fingerprint(params) != before:
        raise RuntimeError("group fidelity: the weights did not come back bit for bit")
    return out


def _changes(now: Union[float, Mapping[str, float]],
             base: Union[float, Mapping[str, float]]) -> Dict[str, float]:  # fmt: skip
    """Per row set, loss now minus the base loss ({} when `loss()` returns one number)."""
    if not isinstance(now, Mapping):
        return {}
    if not isinstance(base, Mapping) or set(base) != set(now):
        raise ValueError(f"base losses {base!r} do not name the row sets {sorted(now)}")
    return {n: float(v) - float(base[n]) for n, v in now.items()}


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
    Where the samples were measured on both halves, ``random k=<k> <direction>``
    for the other directions of `DIRECTIONS` (``all``, ``A→A``, ``B→B``, ``B→A``;
    the groups above are ``A→B``). Where the quadratic group term was computed,
    ``taylor`` also gets
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
    # Random subsets per size in the other directions (where the record measured them).
    for m in methods:
        for d in DIRECTIONS:
            if d == "A→B":  # the groups above
                continue
            by_k: Dict[int, List[Tuple[float, float]]] = {}
            for x in groups["random"]:
                got = x.pair(m, d)
                if got is not None:
                    by_k.setdefault(x.k, []).append(got)
            for k, pairs in sorted(by_k.items()):
                pred, actual = [p for p, _ in pairs], [a for _, a in pairs]
                out[m][f"random k={k} {d}"] = _stats(pred, actual, resamples, seed)
    quad = [s for s in groups["random"] if s.quadratic is not None]
    if quad and "taylor" in out:
        # The full second-order Taylor expansion of zeroing the subset.
        pred = [s.predicted["taylor"] + s.quadratic for s in quad]
        out["taylor"]["random+quadratic"] = _stats(pred, [s.actual for s in quad], resamples, seed)
    return out
