"""Gains across fine-tuning seeds: checkpoints grouped by target accuracy, mean ± sd per method.

Checkpoints with the same target (`CheckpointInfo.target`) are the same
experiment from different fine-tuning seeds (``metadata["seed"]``). For each
target reached by at least two checkpoints and each method: the reference gain
(`mftx.study.report.summaries.in_sample`), the held-out gain (mean of the two folds)
and the gain beyond recalibration (mean of the two folds), each as mean ± sample
sd across the checkpoints and its 95 % Student-t interval (``_lo``, ``_hi``; the
checkpoints are independent fine-tuning runs), with how many checkpoints had it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..statistics import t_interval
from .cells import fmt_gain, fmt_pm_gain
from .load import Checkpoint, Run, order_methods
from .summaries import RANDOM, in_sample, mean_sd, method_summary, random_control
from .tables import fmt_accuracy, markdown_table

__all__ = ["MEASURES", "SEED_HEADERS", "seed_groups", "seed_rows", "seed_table"]

#: The measures averaged across seeds (row keys ``<measure>_mean``, ``_sd``, ``_n``).
MEASURES = ("reference_gain", "heldout_gain", "beyond_recalibration")


def seed_groups(run: Run) -> Dict[float, List[Checkpoint]]:
    """Checkpoints by target, targets reached by at least two checkpoints, ascending."""
    by: Dict[float, List[Checkpoint]] = {}
    for ckpt in run.checkpoints:
        if ckpt.target is not None:
            by.setdefault(ckpt.target, []).append(ckpt)
    return {t: by[t] for t in sorted(by) if len(by[t]) >= 2}


def _measures(ckpt: Checkpoint, method: str) -> Dict[str, Optional[float]]:
    if method == RANDOM:
        if RANDOM not in ckpt.heldouts:
            return dict.fromkeys(MEASURES)
        r = random_control(ckpt.heldouts[RANDOM])
        ref = r["reference"] or {}
        return {"reference_gain": ref.get("gain"), "heldout_gain": r["mean_gain"],
                "beyond_recalibration": r["mean_beyond_recalibration"]}  # fmt: skip
    ref = in_sample(ckpt, method)
    out = {"reference_gain": None if ref is None else ref["gain"], "heldout_gain": None,
           "beyond_recalibration": None}  # fmt: skip
    h = ckpt.heldouts.get(method)
    if h is not None:
        held = method_summary(h, split=ckpt.split)["heldout"]
        out.update(heldout_gain=held["mean_gain"],
                   beyond_recalibration=held["mean_beyond_recalibration"])  # fmt: skip
    return out


def _finite(x: float) -> Optional[float]:
    return None if x != x else x  # NaN (fewer than two values): no interval


def seed_rows(run: Run) -> List[Dict[str, Any]]:
    """One row per target (reached at least twice) and method."""
    rows = []
    for target, ckpts in seed_groups(run).items():
        methods = set()
        for c in ckpts:
            methods |= set(c.sweeps) | set(c.heldouts)
        ordered = order_methods(methods - {RANDOM}) + ([RANDOM] if RANDOM in methods else [])
        for m in ordered:
            values = [_measures(c, m) for c in ckpts]
            row: Dict[str, Any] = {
                "target": target, "method": m, "checkpoints": [c.name for c in ckpts],
                "seeds": [c.metadata.get("seed") for c in ckpts],
            }  # fmt: skip
            for key in MEASURES:
                stats = mean_sd([v[key] for v in values])
                ci = t_interval([v[key] for v in values])
                row.update({f"{key}_mean": stats["mean"], f"{key}_sd": stats["sd"],
                            f"{key}_n": stats["n"], f"{key}_lo": _finite(ci["lo"]),
                            f"{key}_hi": _finite(ci["hi"])})  # fmt: skip
            rows.append(row)
    return rows


SEED_HEADERS = (
    "target", "method", "checkpoints", "seeds", "reference gain ± sd [95 % t-interval]",
    "held-out gain ± sd [95 % t-interval]", "beyond recalibration ± sd [95 % t-interval]",
)  # fmt: skip


def _cell(row: Dict[str, Any], key: str) -> str:
    text = fmt_pm_gain(row[f"{key}_mean"], row[f"{key}_sd"])
    if row[f"{key}_lo"] is not None:
        text += f" [{fmt_gain(row[f'{key}_lo'])}, {fmt_gain(row[f'{key}_hi'])}]"
    n = row[f"{key}_n"]
    return text if n == len(row["checkpoints"]) or n == 0 else f"{text} (n = {n})"


def seed_table(run: Run) -> str:
    """Markdown: mean ± sd across seeds per target and method ("" when no target repeats)."""
    rows = seed_rows(run)
    if not rows:
        return ""
    body = [
        [fmt_accuracy(r["target"]), "random-k" if r["method"] == RANDOM else r["method"],
         str(len(r["checkpoints"])), ", ".join("?" if s is None else str(s) for s in r["seeds"]),
         *[_cell(r, key) for key in MEASURES]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(SEED_HEADERS, body, left=2)
