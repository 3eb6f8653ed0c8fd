"""The reference and held-out protocols of the masking sweep, with their controls.

Every evaluation runs the (masked) model once over all dev rows and keeps, per
row set ("all", and the split's halves "A" and "B"), accuracy, loss and the
predicted-class shares; each row's predicted class (one byte per row, so any
comparison can be re-tested later); and the recalibration control: for each
fold, the logit offset that is best on the selection half, with the accuracy it
gives on the evaluation half (``recal``), on the selection half itself
(``recal_self``) and the evaluation rows' predictions after it (``pred_recal``).

A method's sweep is evaluated for each of its score sets: ``"all"`` (validation
gradient from every dev row: the reference study's protocol) and, for methods
that use the validation gradient, ``"A"`` and ``"B"`` (from one half only).
Methods that do not use it (gradient rule, magnitude) have the one set "all";
a method that uses it and lacks a fold's set is an error, never the all-rows set
(which has seen the evaluation half). The random-k control masks k uniformly
random analysed parameters, one score set per draw ("draw0", "draw1", ...).

Summaries (pure functions of the records):
- reference: scores from all rows, best k chosen on all rows, accuracy on all rows;
- held-out, fold A->B: scores from A (when the method uses them), best k chosen
  on A among k = 0 (no masking) and the sweep, accuracy on B; then B->A. The gain
  is against the unmasked model on the same evaluation rows.
- beyond recalibration (fair): k chosen on A by accuracy *after A's own offset*
  (k = 0 a candidate), then (masked + its offset) - (unmasked + its offset) on B,
  both offsets chosen on A. A method that changes nothing scores exactly 0.
  The older, lopsided difference (masked without an offset minus the
  recalibrated unmasked model) is kept as ``vs_recalibrated_baseline``.
- intervals: paired bootstrap over the evaluation rows (95 %) and McNemar's exact
  test, for each fold and for the mean of the two folds (their rows are disjoint).
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
from .config import parse_method
from .groups import _sample
from .heldout import DevRows, RowSplit, best_offset, decode_rows, encode_rows, row_metrics
from .schema import Reader, register
from .stages import Stage
from .statistics import mcnemar, paired_difference

__all__ = [
    "FIXED_K",
    "ROW_SETS",
    "Heldout",
    "MissingFoldScores",
    "ProtocolPoint",
    "RepeatedSplits",
    "RowStats",
    "SplitInfo",
    "evaluate_point",
    "fold_scores",
    "heldout_summary",
    "measure_logits",
    "random_summary",
    "reference_summary",
    "run_random",
    "run_sweeps",
    "uses_validation",
]

ROW_SETS = ("all", "A", "B")
#: Bootstrap resamples of the paired intervals (seeded: a summary is a pure function).
RESAMPLES = 2000
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
    masked model); ``recal["B->A"]`` the other way round. ``recal_self["A->B"]``:
    accuracy on A after that same offset (what the selection half sees).
    ``pred``: every dev row's predicted class (`encode_rows`, dev-file order);
    ``pred_recal[fold]``: the same after the fold's offset. k = 0: unmasked.
    Records written before these existed have ``recal_self``/``pred_recal`` empty
    and ``pred`` None; summaries then say what they could not compute.
    """

    scores: str
    k: int
    removed: int
    rows: Dict[str, RowStats]
    recal: Dict[str, float]
    recal_self: Dict[str, float] = field(default_factory=dict)
    pred: Optional[str] = None
    pred_recal: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        out = {
            "scores": self.scores, "k": self.k, "removed": self.removed,
            "rows": {name: s.to_json() for name, s in self.rows.items()}, "recal": self.recal,
        }  # fmt: skip
        if self.recal_self:
            out["recal_self"] = self.recal_self
        if self.pred is not None:
            out["pred"] = self.pred
        if self.pred_recal:
            out["pred_recal"] = self.pred_recal
        return out

    @classmethod
    def from_json(cls, r: Reader) -> ProtocolPoint:
        rows = {name: RowStats.from_json(sub) for name, sub in r.mapping("rows").items()}
        recal = r.sub("recal")
        own = r.sub("recal_self") if "recal_self" in r.obj else None
        preds = r.sub("pred_recal") if "pred_recal" in r.obj else None
        return cls(
            r.str("scores"), r.int("k"), r.int("removed"), rows,
            {name: recal.float(name) for name in recal.obj},
            {} if own is None else {name: own.float(name) for name in own.obj},
            r.str("pred", None),
            {} if preds is None else {name: preds.str(name) for name in preds.obj},
        )  # fmt: skip


@register("heldout", 1, per_method=True)
@dataclass
class Heldout:
    """A method's sweeps for each of its score sets, on every row set, with the baseline."""

    method: str
    baseline: ProtocolPoint
    points: List[ProtocolPoint] = field(default_factory=list)
    restored_bitwise: Optional[bool] = None
    #: Every dev row's label (`encode_rows`), for the per-row comparisons; None in old records.
    labels: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        out = {
            "method": self.method, "baseline": self.baseline.to_json(),
            "points": [p.to_json() for p in self.points], "restored_bitwise": self.restored_bitwise,
        }  # fmt: skip
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    @classmethod
    def from_json(cls, r: Reader) -> Heldout:
        return cls(
            r.str("method"), ProtocolPoint.from_json(r.sub("baseline")),
            [ProtocolPoint.from_json(p) for p in r.each("points")], r.bool("restored_bitwise", None),
            r.str("labels", None),
        )  # fmt: skip

    def score_sets(self) -> List[str]:
        return sorted({p.scores for p in self.points})

    def curve(self, scores: str) -> Dict[int, ProtocolPoint]:
        return {p.k: p for p in self.points if p.scores == scores}


@register("splits", 1)
@dataclass
class RepeatedSplits:
    """Each split seed's held-out summary per method (the first seed: the main split).

    Per method and seed: the held-out gain and the gain beyond recalibration (means
    of the two folds) with their paired bootstrap intervals (None for records without
    per-row predictions), and the ks chosen.
    """

    seeds: List[int]
    methods: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"seeds": self.seeds, "methods": self.methods}

    @classmethod
    def from_json(cls, r: Reader) -> RepeatedSplits:
        return cls([int(x) for x in r.list("seeds")], dict(r.obj["methods"]))


# --------------------------------------------------------------------------- evaluation


def evaluate_point(model, rows: DevRows, split: RowSplit) -> Dict[str, Any]:
    """One pass over the dev rows: `RowStats` per row set, per-row predictions and both
    recalibration directions (accuracy on each half, predictions after the offset)."""
    logits = rows.logits(model)
    return measure_logits(logits, rows.labels, split)


def measure_logits(logits: torch.Tensor, y: torch.Tensor, split: RowSplit) -> Dict[str, Any]:
    """`evaluate_point` from per-row logits (file order) and labels."""
    sets = {"all": None, "A": split.a, "B": split.b}
    stats = {name: RowStats(**row_metrics(logits, y, idx)) for name, idx in sets.items()}
    recal, recal_self, pred_recal = {}, {}, {}
    for name, sel, ev in split.folds():
        off = best_offset(logits, y, sel)
        recal[name] = row_metrics(logits, y, ev, offset=off)["accuracy"]
        recal_self[name] = row_metrics(logits, y, sel, offset=off)["accuracy"]
        pred_recal[name] = encode_rows((logits.double() + off).argmax(-1))
    return {"rows": stats, "recal": recal, "recal_self": recal_self,
            "pred": encode_rows(logits.argmax(-1)), "pred_recal": pred_recal}  # fmt: skip


def _point(scores: str, k: int, removed: int, ev: Dict[str, Any]) -> ProtocolPoint:
    return ProtocolPoint(scores, k, removed, ev["rows"], ev["recal"], ev.get("recal_self", {}),
                         ev.get("pred"), ev.get("pred_recal", {}))  # fmt: skip


def _run(
    stage: Stage,
    method: str,
    space: ParamSpace,
    sets: Dict[str, Candidates],
    ks: Sequence[int],
    measure: Callable[[], Dict[str, Any]],
    progress: bool,
    labels: Optional[torch.Tensor] = None,
) -> Heldout:
    prev = stage.previous()
    done = {(p.scores, p.k): p for p in prev.result.points} if prev is not None else {}
    ks = masking.check_ks(list(ks))
    want = {(name, k) for name in sets for k in ks}
    if prev is not None and prev.complete and want <= set(done):
        return prev.result
    base = prev.result.baseline if prev is not None else _point("none", 0, 0, measure())
    record = Heldout(method, base, [], None, None if labels is None else encode_rows(labels))

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
                lambda: evaluate_point(model, rows, split), progress, rows.labels)  # fmt: skip


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
                lambda: evaluate_point(model, rows, split), progress, rows.labels)  # fmt: skip


# --------------------------------------------------------------------------- summaries


def _best(curve: Dict[int, ProtocolPoint], rows: str) -> Optional[ProtocolPoint]:
    """Most accurate point on `rows`; ties to the smallest k."""
    if not curve:
        return None
    return min(curve.values(), key=lambda p: (-p.rows[rows].accuracy, p.k))


def _choose(points: Sequence[ProtocolPoint], value: Callable[[ProtocolPoint], float]):
    """The point of highest `value`; ties to the smallest k (k = 0, no masking, first)."""
    return min(points, key=lambda p: (-value(p), p.k))


def _correct(h: Heldout, pred: Optional[str], rows: Sequence[int]) -> Optional[torch.Tensor]:
    if pred is None or h.labels is None:
        return None
    idx = torch.as_tensor(list(rows), dtype=torch.int64)
    return (decode_rows(pred)[idx] == decode_rows(h.labels)[idx]).double()


def _interval(pairs: List[Optional[tuple]], seed: int = 0) -> Optional[Dict[str, float]]:
    """Paired bootstrap interval and McNemar's test of (new, old) correctness over folds."""
    if not pairs or any(p is None or p[0] is None or p[1] is None for p in pairs):
        return None
    out = paired_difference(pairs, resamples=RESAMPLES, seed=seed)
    new = torch.cat([p[0] for p in pairs])
    old = torch.cat([p[1] for p in pairs])
    return {**out, **{f"mcnemar_{k}": v for k, v in mcnemar(new, old).items()}}


def reference_summary(h: Heldout, fixed_k: int = FIXED_K) -> Dict[str, Any]:
    """Scores from all rows, best k chosen on all rows, accuracy on all rows.

    ``gain_ci``: the paired bootstrap interval over all rows (it covers row noise,
    not the in-sample choice of k and scores), None for records without predictions.
    """
    curve = h.curve("all")
    best = _best(curve, "all")
    base = h.baseline.rows["all"].accuracy
    out: Dict[str, Any] = {"baseline": base, "best_k": None, "accuracy": None, "gain": None,
                           "gain_ci": None}  # fmt: skip
    if best is not None:
        acc = best.rows["all"].accuracy
        rows = range(h.baseline.rows["all"].n)
        pair = (_correct(h, best.pred, rows), _correct(h, h.baseline.pred, rows))
        out.update(best_k=best.k, accuracy=acc, gain=acc - base, gain_ci=_interval([pair]))
    at = curve.get(fixed_k)
    out["at_fixed_k"] = None if at is None else at.rows["all"].accuracy
    out["gain_at_fixed_k"] = None if at is None else at.rows["all"].accuracy - base
    return out


class MissingFoldScores(LookupError):
    """A method that uses the validation gradient has no scores from a fold's selection half."""


def uses_validation(method: str) -> bool:
    """Whether a method label's scores depend on the validation gradient."""
    from ..scores import METHODS

    return "val" in METHODS[parse_method(method).method]["uses"]


def fold_scores(h: Heldout, sel: str) -> str:
    """The score set selecting on half `sel`: its own when the method uses the validation
    gradient (an error if missing: the all-rows set has seen the evaluation half), else "all"."""
    if sel in h.score_sets():
        return sel
    if uses_validation(h.method):
        raise MissingFoldScores(
            f"held-out record of {h.method!r} has no score set {sel!r} (scores from half {sel}); "
            f"it uses the validation gradient, so the all-rows scores would leak the evaluation "
            f"half: recompute the fold scores (mftx analyze --heldout)"
        )
    return "all"


def heldout_summary(h: Heldout, fixed_k: int = FIXED_K,
                    rows_of: Optional[Dict[str, Sequence[int]]] = None) -> Dict[str, Any]:  # fmt: skip
    """Both folds: scores and best k from the selection half, measured on the other half.

    k = 0 (no masking) is a candidate of both choices. ``gain``: accuracy at the
    k best on the selection half, minus the unmasked model's, on the evaluation
    half. ``beyond_recalibration``: at the k best on the selection half *after its
    own offset*, (masked + offset) - (unmasked + offset) on the evaluation half.
    `rows_of` ({"A": rows, "B": rows}, the split's halves) gives each fold's
    paired bootstrap intervals (``gain_ci``, ``beyond_recalibration_ci``) and
    McNemar's test; without it, or for records without predictions, they are None.
    """
    folds = []
    pairs: Dict[str, List[Optional[tuple]]] = {
        "gain": [], "beyond_recalibration": [], "recalibration_alone": [],
    }  # fmt: skip
    for name, sel, ev in (("A->B", "A", "B"), ("B->A", "B", "A")):
        scores = fold_scores(h, sel)
        curve = h.curve(scores)
        base = h.baseline.rows[ev]
        recal_alone = h.baseline.recal[name]
        fold: Dict[str, Any] = {
            "fold": name, "scores": scores, "baseline": base.accuracy,
            "recalibrated": recal_alone, "share_before": base.predicted_share,
        }  # fmt: skip
        cands = [h.baseline, *curve.values()]
        best = _choose(cands, lambda p, sel=sel: p.rows[sel].accuracy)
        acc = best.rows[ev].accuracy
        if all(name in p.recal_self for p in cands):
            rbest = _choose(cands, lambda p, name=name: p.recal_self[name])
            rule = "recalibrated accuracy on the selection half"
        else:
            rbest = best
            rule = "accuracy on the selection half (record without recal_self)"
        fold.update(
            best_k=best.k, accuracy=acc, gain=acc - base.accuracy,
            vs_recalibrated_baseline=acc - recal_alone, share_after=best.rows[ev].predicted_share,
            recal_best_k=rbest.k, masked_recalibrated=rbest.recal[name],
            beyond_recalibration=rbest.recal[name] - recal_alone, recal_rule=rule,
        )  # fmt: skip
        gain_pair = beyond_pair = alone_pair = None
        if rows_of is not None:
            ev_rows = rows_of[ev]
            unmasked = _correct(h, h.baseline.pred, ev_rows)
            recal_unmasked = _correct(h, h.baseline.pred_recal.get(name), ev_rows)
            gain_pair = (_correct(h, best.pred, ev_rows), unmasked)
            beyond_pair = (_correct(h, rbest.pred_recal.get(name), ev_rows), recal_unmasked)
            alone_pair = (recal_unmasked, unmasked)
        fold["recalibration_alone"] = recal_alone - base.accuracy
        fold["gain_ci"] = _interval([gain_pair]) if gain_pair else None
        fold["beyond_recalibration_ci"] = _interval([beyond_pair]) if beyond_pair else None
        pairs["gain"].append(gain_pair)
        pairs["beyond_recalibration"].append(beyond_pair)
        pairs["recalibration_alone"].append(alone_pair)
        at = curve.get(fixed_k)
        fold["at_fixed_k"] = None if at is None else at.rows[ev].accuracy
        fold["gain_at_fixed_k"] = None if at is None else at.rows[ev].accuracy - base.accuracy
        folds.append(fold)
    keys = ("gain", "beyond_recalibration", "vs_recalibrated_baseline", "gain_at_fixed_k",
            "recalibration_alone")  # fmt: skip
    return {
        "folds": folds, **_mean_of(folds, keys),
        **{f"mean_{key}_ci": _interval(p) for key, p in pairs.items()},
    }  # fmt: skip


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
        # k = 0 (no masking) is a candidate, as in `heldout_summary`.
        cands = {
            0: h.baseline.rows[sel].accuracy,
            **{kk: v[sel]["mean"] for kk, v in per_k.items()},
        }
        k = min(cands, key=lambda kk: (-cands[kk], kk))
        acc = base if k == 0 else per_k[k][ev]["mean"]
        sd = 0.0 if k == 0 else per_k[k][ev]["sd"]
        folds.append({"fold": name, "baseline": base, "best_k": k, "accuracy": acc,
                      "sd": sd, "gain": acc - base})  # fmt: skip
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
