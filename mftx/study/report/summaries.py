"""The numbers behind the held-out tables, computed once from a checkpoint's records.

`method_summary` gives a method's reference protocol (scores, best k and
accuracy on all dev rows) and held-out protocol (each fold: scores and best k
from the selection half, accuracy on the evaluation half) with its controls;
`random_control` the same for the random-k control (means and sds over draws);
`in_sample` the reference protocol from the held-out record when there is one,
else from the plain masking sweep. All of them are pure functions of the
records (`mftx.study.protocol` does the choosing and measuring).
"""

from __future__ import annotations

import math
import statistics as pystats
from typing import Any, Dict, List, Optional, Sequence

from ..heldout import RowSplit
from ..protocol import (
    FIXED_K,
    Heldout,
    _mean_of,
    class_shift,
    heldout_summary,
    random_summary,
    reference_summary,
)
from .load import Checkpoint, order_methods

__all__ = [
    "FOLDS",
    "RANDOM",
    "in_sample",
    "mean_sd",
    "method_summary",
    "protocol_methods",
    "random_control",
    "split_summary",
]

#: (fold name, selection half, evaluation half), as in `mftx.study.heldout.RowSplit.folds`.
FOLDS = (("A->B", "A", "B"), ("B->A", "B", "A"))
#: The method name of the random-k control's record (``heldout-random.json``).
RANDOM = "random"


def protocol_methods(ckpt: Checkpoint) -> List[str]:
    """Methods with a held-out record, in table order (the random-k control left out)."""
    return order_methods(m for m in ckpt.heldouts if m != RANDOM)


def mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean, sample sd (n - 1; 0 for one value) and n of the defined values.

    ``mean`` and ``sd`` are None when no value is defined.
    """
    ok = [v for v in values if v is not None and not math.isnan(v)]
    if not ok:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": pystats.fmean(ok), "sd": pystats.stdev(ok) if len(ok) > 1 else 0.0,
            "n": len(ok)}  # fmt: skip


def _rows_of(split: Optional[RowSplit]) -> Optional[Dict[str, Sequence[int]]]:
    return None if split is None else {"A": split.a, "B": split.b}


def method_summary(h: Heldout, fixed_k: int = FIXED_K,
                   split: Optional[RowSplit] = None) -> Dict[str, Any]:  # fmt: skip
    """Both protocols of one method.

    ``reference``: `mftx.study.protocol.reference_summary` plus the predicted-class
    shares before and after masking at its best k; ``heldout``:
    `mftx.study.protocol.heldout_summary` plus the means over folds of the held-out
    accuracy, of the masked-and-recalibrated accuracy and of the accuracy at
    `fixed_k`; ``class_shift``: total variation of the predicted-class shares
    at the reference best k. `split` (the checkpoint's) adds the paired intervals.
    """
    ref = reference_summary(h, fixed_k)
    ref["share_before"] = h.baseline.rows["all"].predicted_share
    best = h.curve("all").get(ref["best_k"]) if ref["best_k"] is not None else None
    ref["share_after"] = None if best is None else best.rows["all"].predicted_share
    held = heldout_summary(h, fixed_k, _rows_of(split))
    held.update(_mean_of(held["folds"], ("accuracy", "masked_recalibrated", "at_fixed_k")))
    return {"method": h.method, "reference": ref, "heldout": held, "class_shift": class_shift(h)}


def _mean_shares(shares: List[List[float]]) -> Optional[List[float]]:
    if not shares:
        return None
    return [pystats.fmean(col) for col in zip(*shares)]


def random_control(h: Heldout, fixed_k: int = FIXED_K) -> Dict[str, Any]:
    """The random-k control: `mftx.study.protocol.random_summary` with the controls of each fold.

    Each fold (best k chosen on the selection half by the mean over draws, k = 0
    a candidate) also gets ``recalibrated`` (the unmasked model recalibrated), the
    predicted-class shares before and after (mean over draws), and the fair
    recalibration control: ``recal_best_k`` chosen by the mean over draws of the
    selection half's accuracy after its own offset (k = 0 a candidate),
    ``masked_recalibrated`` (mean over draws at that k) and ``beyond_recalibration``
    (that minus the recalibrated unmasked model); ``vs_recalibrated_baseline`` is
    the older, lopsided difference. ``reference`` gets the sd over draws and the
    accuracy at `fixed_k` (mean and sd over draws, on all rows).
    """
    r = random_summary(h, fixed_k)
    for fold, (name, _, ev) in zip(r["folds"], FOLDS):
        fold["recalibrated"] = h.baseline.recal[name]
        fold["share_before"] = h.baseline.rows[ev].predicted_share
        k = fold.get("best_k")
        if k is None:
            continue
        by_k: Dict[int, List[Any]] = {0: [h.baseline]}
        for p in h.points:
            by_k.setdefault(p.k, []).append(p)
        fold["vs_recalibrated_baseline"] = fold["accuracy"] - fold["recalibrated"]
        fold["share_after"] = _mean_shares([p.rows[ev].predicted_share for p in by_k[k]])
        if all(name in p.recal_self for p in [h.baseline, *h.points]):
            own = {kk: pystats.fmean(p.recal_self[name] for p in pts) for kk, pts in by_k.items()}
            rk = min(own, key=lambda kk: (-own[kk], kk))
            fold["recal_rule"] = "recalibrated accuracy on the selection half"
        else:
            rk = k
            fold["recal_rule"] = "accuracy on the selection half (record without recal_self)"
        fold["recal_best_k"] = rk
        fold["masked_recalibrated"] = pystats.fmean(p.recal[name] for p in by_k[rk])
        fold["beyond_recalibration"] = fold["masked_recalibrated"] - fold["recalibrated"]
    r.update(_mean_of(r["folds"], ("beyond_recalibration", "vs_recalibrated_baseline",
                                   "accuracy", "masked_recalibrated")))  # fmt: skip
    ref = r["reference"]
    if ref is not None:
        ref["baseline"] = h.baseline.rows["all"].accuracy
        ref["share_before"] = h.baseline.rows["all"].predicted_share
        ref["sd"] = r["per_k"][ref["best_k"]]["all"]["sd"]
        ref["share_after"] = _mean_shares(
            [p.rows["all"].predicted_share for p in h.points if p.k == ref["best_k"]]
        )
    fixed = r["at_fixed_k"]
    r["fixed"] = None if fixed is None else dict(fixed["all"], draws=fixed["draws"])
    r["fixed_heldout"] = (
        None if fixed is None else pystats.fmean(fixed[ev]["mean"] for _, _, ev in FOLDS)
    )
    r["draws"] = len({p.scores for p in h.points})
    r["baseline"] = h.baseline.rows["all"].accuracy
    return r


def in_sample(ckpt: Checkpoint, method: str, fixed_k: int = FIXED_K) -> Optional[Dict[str, Any]]:
    """The reference protocol of `method`: best k, accuracy and gain on all dev rows.

    From the held-out record when there is one (the same evaluation as the
    held-out columns), else from the masking sweep; None when neither exists.
    Keys: ``baseline``, ``best_k``, ``accuracy``, ``gain``, ``at_fixed_k``,
    ``gain_at_fixed_k`` (None where undefined).
    """
    h = ckpt.heldouts.get(method)
    if h is not None:
        return reference_summary(h, fixed_k)
    sweep = ckpt.sweeps.get(method)
    base = ckpt.baseline_for(method)
    if sweep is None or base is None:
        return None
    best = sweep.best()
    at = next((p for p in sweep.points if p.k == fixed_k), None)
    out: Dict[str, Any] = {"baseline": base.accuracy, "best_k": None, "accuracy": None,
                           "gain": None}  # fmt: skip
    if best is not None:
        out.update(best_k=best.k, accuracy=best.accuracy, gain=best.accuracy - base.accuracy)
    out["at_fixed_k"] = None if at is None else at.accuracy
    out["gain_at_fixed_k"] = None if at is None else at.accuracy - base.accuracy
    return out


def split_summary(split: RowSplit, held: Dict[str, Heldout]) -> Dict[str, Dict[str, Any]]:
    """One split's held-out numbers per method (as `RepeatedSplits` keeps them)."""
    out = {}
    for label, h in held.items():
        if label == "random":
            r = random_control(h)
            out[label] = {"seed": split.seed, "gain": r["mean_gain"],
                          "beyond": r["mean_beyond_recalibration"]}  # fmt: skip
            continue
        s = method_summary(h, split=split)["heldout"]
        ab, ba = s["folds"]
        g, b = s["mean_gain_ci"] or {}, s["mean_beyond_recalibration_ci"] or {}
        out[label] = {
            "seed": split.seed, "gain": s["mean_gain"], "gain_lo": g.get("lo"),
            "gain_hi": g.get("hi"), "beyond": s["mean_beyond_recalibration"],
            "beyond_lo": b.get("lo"), "beyond_hi": b.get("hi"),
            "best_k": [ab["best_k"], ba["best_k"]], "recal_best_k": [ab["recal_best_k"],
                                                                     ba["recal_best_k"]],
        }  # fmt: skip
    return out
