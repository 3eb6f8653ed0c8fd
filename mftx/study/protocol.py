"""The reference and held-out protocols of the masking sweep, with their controls.

Every evaluation runs the (masked) model once over all dev rows and keeps, per
row set ("all", and the split's halves "A" and "B"), accuracy, loss and the
predicted-class shares, plus the recalibration control: the accuracy on one
half after the logit offset that is best on the other half (`best_offset`).

A method's sweep is evaluated for each of its score sets: ``"all"`` (validation
gradient from every dev row: the reference study's protocol) and, for methods
that use the validation gradient, ``"A"`` and ``"B"`` (from one half only).
Methods that do not use it (gradient rule, magnitude) have the one set "all".
The random-k control masks k uniformly random analysed parameters, one score
set per draw ("draw0", "draw1", ...).

Summaries (pure functions of the records):
- reference: scores from all rows, best k chosen on all rows, accuracy on all rows;
- held-out, fold A->B: scores from A (when the method uses them), best k chosen
  on A, accuracy on B; then B->A. The gain is against the baseline on the same
  evaluation rows, and "beyond recalibration" against the baseline recalibrated
  with the offset chosen on the selection rows.
"""

from __future__ import annotations

import math
import statistics as pystats
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import masking
from ..core.params import ParamSpace
from ..ops import Candidates
from ..ops.indexing import FlatIndex
from .groups import _sample
from .heldout import DevRows, RowSplit, best_offset, row_metrics
from .schema import Reader, register
from .stages import Stage

__all__ = [
    "FIXED_K",
    "ROW_SETS",
    "Heldout",
    "ProtocolPoint",
    "RowStats",
    "SplitInfo",
    "evaluate_point",
    "heldout_summary",
    "random_summary",
    "reference_summary",
    "run_random",
    "run_sweeps",
]

ROW_SETS = ("all", "A", "B")
#: The k the reference study reports (removing 5,000 parameters).
FIXED_K = 5000


# --------------------------------------------------------------------------- records


@register("split", 1)
@dataclass
class SplitInfo:
    """The seeded two-fold split of the dev rows (row numbers in dev-file order, with hashes)."""

    split: RowSplit

    def to_json(self) -> Dict[str, Any]:
        return self.split.to_json()

    @classmethod
    def from_json(cls, r: Reader) -> SplitInfo:
        try:
            return cls(RowSplit.from_json(r.obj))
        except (KeyError, ValueError, TypeError) as err:
            raise r.fail("a", f"is not a valid split: {err}") from None


@dataclass(frozen=True)
class RowStats:
    """Accuracy, mean cross-entropy and predicted-class shares on one row set."""

    accuracy: float
    loss: float
    predicted_share: List[float]
    n: int

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> RowStats:
        return cls(r.float("accuracy"), r.float("loss"), r.list("predicted_share"), r.int("n"))


@dataclass(frozen=True)
class ProtocolPoint:
    """The model with the top-``k`` of score set ``scores`` masked, on every row set.

    ``recal["A->B"]``: accuracy on B after the logit offset chosen on A (of this
    masked model); ``recal["B->A"]`` the other way round. k = 0: unmasked.
    """

    scores: str
    k: int
    removed: int
    rows: Dict[str, RowStats]
    recal: Dict[str, float]

    def to_json(self) -> Dict[str, Any]:
        return {
            "scores": self.scores, "k": self.k, "removed": self.removed,
            "rows": {name: s.to_json() for name, s in self.rows.items()}, "recal": self.recal,
        }  # fmt: skip

    @classmethod
    def from_json(cls, r: Reader) -> ProtocolPoint:
        rows = {name: RowStats.from_json(sub) for name, sub in r.mapping("rows").items()}
        recal = r.sub("recal")
        return cls(
            r.str("scores"), r.int("k"), r.int("removed"), rows,
            {name: recal.float(name) for name in recal.obj},
        )  # fmt: skip


@register("heldout", 1, per_method=True)
@dataclass
class Heldout:
    """A method's sweeps for each of its score sets, on every row set, with the baseline."""

    method: str
    baseline: ProtocolPoint
    points: List[ProtocolPoint] = field(default_factory=list)
    restored_bitwise: Optional[bool] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "method": self.method, "baseline": self.baseline.to_json(),
            "points": [p.to_json() for p in self.points], "restored_bitwise": self.restored_bitwise,
        }  # fmt: skip

    @classmethod
    def from_json(cls, r: Reader) -> Heldout:
        return cls(
            r.str("method"), ProtocolPoint.from_json(r.sub("baseline")),
            [ProtocolPoint.from_json(p) for p in r.each("points")], r.bool("restored_bitwise", None),
        )  # fmt: skip

    def score_sets(self) -> List[str]:
        return sorted({p.scores for p in self.points})

    def curve(self, scores: str) -> Dict[int, ProtocolPoint]:
        return {p.k: p for p in self.points if p.scores == scores}


# --------------------------------------------------------------------------- evaluation


def evaluate_point(model, rows: DevRows, split: RowSplit) -> Dict[str, Any]:
    """One pass over the dev rows: `RowStats` per row set and both recalibration directions."""
    logits = rows.logits(model)
    y = rows.labels
    sets = {"all": None, "A": split.a, "B": split.b}
    stats = {name: RowStats(**row_metrics(logits, y, idx)) for name, idx in sets.items()}
    recal = {}
    for name, sel, ev in split.folds():
        off = best_offset(logits, y, sel)
        recal[name] = row_metrics(logits, y, ev, offset=off)["accuracy"]
    return {"rows": stats, "recal": recal}


def _point(scores: str, k: int, removed: int, ev: Dict[str, Any]) -> ProtocolPoint:
    return ProtocolPoint(scores, k, removed, ev["rows"], ev["recal"])


def _run(
    stage: Stage,
    method: str,
    space: ParamSpace,
    sets: Dict[str, Candidates],
    ks: Sequence[int],
    measure: Callable[[], Dict[str, Any]],
    progress: bool,
) -> Heldout:
    prev = stage.previous()
    done = {(p.scores, p.k): p for p in prev.result.points} if prev is not None else {}
    ks = masking.check_ks(list(ks))
    want = {(name, k) for name in sets for k in ks}
    if prev is not None and prev.complete and want <= set(done):
        return prev.result
    base = prev.result.baseline if prev is not None else _point("none", 0, 0, measure())
    record = Heldout(method, base, [])

    def save() -> None:
        record.points = [done[key] for key in sorted(done)]
        stage.save(record, complete=False)

    save()
    for name, cands in sets.items():
        every = sorted(set(ks) | {k for (n, k) in done if n == name})

        def on_point(point: Dict[str, Any], name: str = name) -> None:
            done[(name, point["k"])] = _point(name, point["k"], point["removed"], point)
            save()

        masking.sweep(
            space, cands, every, measure,
            done={k: {"k": k, "removed": p.removed} for (n, k), p in done.items() if n == name},
            on_point=on_point, progress=progress, desc=f"{method} [{name}]",
        )  # fmt: skip
    record.points = [done[key] for key in sorted(done)]
    record.restored_bitwise = True  # masking.sweep raises otherwise
    return stage.save(record).result


def run_sweeps(
    stage: Stage,
    method: str,
    space: ParamSpace,
    candidates: Dict[str, Candidates],
    ks: Sequence[int],
    model,
    rows: DevRows,
    split: RowSplit,
    progress: bool = True,
) -> Heldout:
    """Sweep each score set's top-k (candidates: score-set name -> ranked candidates)."""
    bad = set(candidates) - set(ROW_SETS)
    if bad or not candidates:
        raise ValueError(f"score sets must be among {ROW_SETS}, got {sorted(candidates)}")
    return _run(stage, method, space, candidates, ks,
                lambda: evaluate_point(model, rows, split), progress)  # fmt: skip


def random_candidates(space: ParamSpace, k_max: int, draw: int, seed: int) -> Candidates:
    """k_max uniformly random analysed entries (draw `draw` of a seeded series), in random order."""
    layout = FlatIndex(space.numels)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + draw)
    idx = _sample(layout.total, min(k_max, layout.total), gen)
    idx = idx[torch.randperm(len(idx), generator=gen)]  # nested top-k: a random order
    t, f = layout.split(idx)
    return Candidates(t, f, torch.zeros(len(idx), dtype=torch.float32))


def run_random(
    stage: Stage,
    space: ParamSpace,
    ks: Sequence[int],
    draws: int,
    seed: int,
    model,
    rows: DevRows,
    split: RowSplit,
    progress: bool = True,
) -> Heldout:
    """The random-k control: `draws` series of k random analysed parameters, nested in k."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    k_max = max(masking.check_ks(list(ks)))
    sets = {f"draw{d}": random_candidates(space, k_max, d, seed) for d in range(draws)}
    return _run(stage, "random", space, sets, ks,
                lambda: evaluate_point(model, rows, split), progress)  # fmt: skip


# --------------------------------------------------------------------------- summaries


def _best(curve: Dict[int, ProtocolPoint], rows: str) -> Optional[ProtocolPoint]:
    """Most accurate point on `rows`; ties to the smallest k."""
    if not curve:
        return None
    return min(curve.values(), key=lambda p: (-p.rows[rows].accuracy, p.k))


def reference_summary(h: Heldout, fixed_k: int = FIXED_K) -> Dict[str, Any]:
    """Scores from all rows, best k chosen on all rows, accuracy on all rows."""
    curve = h.curve("all")
    best = _best(curve, "all")
    base = h.baseline.rows["all"].accuracy
    out: Dict[str, Any] = {"baseline": base, "best_k": None, "accuracy": None, "gain": None}
    if best is not None:
        acc = best.rows["all"].accuracy
        out.update(best_k=best.k, accuracy=acc, gain=acc - base)
    at = curve.get(fixed_k)
    out["at_fixed_k"] = None if at is None else at.rows["all"].accuracy
    out["gain_at_fixed_k"] = None if at is None else at.rows["all"].accuracy - base
    return out


def _fold_sets(h: Heldout, sel: str) -> str:
    """Score set used when `sel` selects: its own when the method has one, else 'all'."""
    return sel if sel in h.score_sets() else "all"


def heldout_summary(h: Heldout, fixed_k: int = FIXED_K) -> Dict[str, Any]:
    """Both folds: scores and best k from the selection half, measured on the other half."""
    folds = []
    for name, sel, ev in (("A->B", "A", "B"), ("B->A", "B", "A")):
        curve = h.curve(_fold_sets(h, sel))
        best = _best(curve, sel)
        base = h.baseline.rows[ev]
        recal_alone = h.baseline.recal[name]
        fold: Dict[str, Any] = {
            "fold": name, "scores": _fold_sets(h, sel), "baseline": base.accuracy,
            "recalibrated": recal_alone, "share_before": base.predicted_share,
        }  # fmt: skip
        if best is not None:
            acc = best.rows[ev].accuracy
            fold.update(
                best_k=best.k, accuracy=acc, gain=acc - base.accuracy,
                beyond_recalibration=acc - recal_alone, masked_recalibrated=best.recal[name],
                share_after=best.rows[ev].predicted_share,
            )  # fmt: skip
        at = curve.get(fixed_k)
        fold["at_fixed_k"] = None if at is None else at.rows[ev].accuracy
        fold["gain_at_fixed_k"] = None if at is None else at.rows[ev].accuracy - base.accuracy
        folds.append(fold)
    return {"folds": folds, **_mean_of(folds, ("gain", "beyond_recalibration", "gain_at_fixed_k"))}


def _mean_of(folds: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Optional[float]]:
    out = {}
    for key in keys:
        vals = [f.get(key) for f in folds]
        ok = [v for v in vals if v is not None and not math.isnan(v)]
        out[f"mean_{key}"] = sum(ok) / len(ok) if len(ok) == len(vals) and ok else None
    return out


def random_summary(h: Heldout, fixed_k: int = FIXED_K) -> Dict[str, Any]:
    """The random-k control: mean and sd over draws per k; best k chosen on each half."""
    per_k: Dict[int, Dict[str, Any]] = {}
    for k in sorted({p.k for p in h.points}):
        pts = [p for p in h.points if p.k == k]
        row = {"draws": len(pts)}
        for rows in ROW_SETS:
            accs = [p.rows[rows].accuracy for p in pts]
            row[rows] = {"mean": pystats.fmean(accs),
                         "sd": pystats.stdev(accs) if len(accs) > 1 else 0.0}  # fmt: skip
        per_k[k] = row
    folds = []
    for name, sel, ev in (("A->B", "A", "B"), ("B->A", "B", "A")):
        base = h.baseline.rows[ev].accuracy
        if not per_k:
            folds.append({"fold": name, "baseline": base})
            continue
        k = min(per_k, key=lambda kk: (-per_k[kk][sel]["mean"], kk))
        acc = per_k[k][ev]["mean"]
        folds.append({"fold": name, "baseline": base, "best_k": k, "accuracy": acc,
                      "sd": per_k[k][ev]["sd"], "gain": acc - base})  # fmt: skip
    ref_base = h.baseline.rows["all"].accuracy
    ref_k = min(per_k, key=lambda kk: (-per_k[kk]["all"]["mean"], kk)) if per_k else None
    return {
        "per_k": per_k,
        "folds": folds,
        "reference": None if ref_k is None else {
            "best_k": ref_k, "accuracy": per_k[ref_k]["all"]["mean"],
            "gain": per_k[ref_k]["all"]["mean"] - ref_base,
        },
        "at_fixed_k": per_k.get(fixed_k),
        **_mean_of(folds, ("gain",)),
    }  # fmt: skip


def class_shift(h: Heldout) -> Optional[float]:
    """How far masking at the reference best k moved the predicted shares (total variation)."""
    best = _best(h.curve("all"), "all")
    if best is None:
        return None
    a = h.baseline.rows["all"].predicted_share
    b = best.rows["all"].predicted_share
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))
