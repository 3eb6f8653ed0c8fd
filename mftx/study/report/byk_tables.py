"""Gain at every k under both protocols: what removing k parameters does, not only the best k.

The best-k tables answer "does some k help?"; claims about how removal behaves
as k grows ("removal hurts at later checkpoints", "accuracy collapses past 500
removals") need the whole curve. For each checkpoint with held-out records,
method and k of the sweep: the reference gain (scores from all dev rows,
accuracy on all rows) and each fold's held-out gain at that k (scores from the
selection half, accuracy on the evaluation half; no k is chosen), against the
unmasked model on the same rows. The random-k control gives the mean over its
draws.
"""

from __future__ import annotations

import statistics as pystats
from typing import Any, Dict, List, Optional

from ..protocol import Heldout, fold_scores
from .cells import fmt_gain
from .heldout_tables import _fold_key
from .load import Checkpoint, Run
from .summaries import FOLDS, RANDOM, protocol_methods
from .tables import fmt_count, markdown_table

__all__ = ["BYK_FIELDS", "byk_rows", "byk_table"]

#: Numeric fields of a row (accuracy differences as fractions; None where not measured).
BYK_FIELDS = ("reference_gain", "ab_gain", "ba_gain", "heldout_mean_gain")


def _mean(values: List[float]) -> Optional[float]:
    return pystats.fmean(values) if values else None


def _accuracy(h: Heldout, scores: str, k: int, rows: str) -> Optional[float]:
    """Mean accuracy on `rows` over the points of score set(s) `scores` at k (draws for random)."""
    pts = [p for p in h.points if p.k == k and (scores == "*" or p.scores == scores)]
    return _mean([p.rows[rows].accuracy for p in pts])


def _method_rows(ckpt: Checkpoint, method: str) -> List[Dict[str, Any]]:
    h = ckpt.heldouts[method]
    base = {name: h.baseline.rows[name].accuracy for name in ("all", "A", "B")}
    out = []
    for k in sorted({p.k for p in h.points}):
        row: Dict[str, Any] = {"checkpoint": ckpt.name, "method": method, "k": k}
        # The random control's draws are its score sets: average over all of them.
        ref_set = "*" if method == RANDOM else "all"
        ref = _accuracy(h, ref_set, k, "all")
        row["reference_gain"] = None if ref is None else ref - base["all"]
        folds = []
        for name, sel, ev in FOLDS:
            acc = _accuracy(h, "*" if method == RANDOM else fold_scores(h, sel), k, ev)
            gain = None if acc is None else acc - base[ev]
            row[f"{_fold_key(name)}_gain"] = gain
            if gain is not None:
                folds.append(gain)
        row["heldout_mean_gain"] = _mean(folds) if len(folds) == len(FOLDS) else None
        out.append(row)
    return out


def byk_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint with held-out records, method (then random-k) and k: the gains."""
    rows: List[Dict[str, Any]] = []
    for ckpt in run.checkpoints:
        methods = protocol_methods(ckpt) + ([RANDOM] if RANDOM in ckpt.heldouts else [])
        for m in methods:
            rows.extend(_method_rows(ckpt, m))
    return rows


def byk_table(run: Run) -> str:
    """Markdown: one row per checkpoint and method, a column per k, cells "reference / held-out"."""
    rows = byk_rows(run)
    if not rows:
        return ""
    ks = sorted({r["k"] for r in rows})
    cells: Dict[tuple, Dict[int, str]] = {}
    for r in rows:
        label = "random-k" if r["method"] == RANDOM else r["method"]
        cells.setdefault((r["checkpoint"], label), {})[r["k"]] = (
            f"{fmt_gain(r['reference_gain'])} / {fmt_gain(r['heldout_mean_gain'])}"
        )
    headers = ("checkpoint", "method", *(f"k = {fmt_count(k)}" for k in ks))
    body = [[c, m, *(by.get(k, "—") for k in ks)] for (c, m), by in cells.items()]
    return markdown_table(headers, body, left=2)
