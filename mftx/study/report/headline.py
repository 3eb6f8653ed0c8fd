"""The plain-language summary of a run: each gain with its interval and what it supports.

`headline` turns a loaded run's held-out and fresh-row records into a few lines
per checkpoint (what `mftx demo` ends with): the gain where the reference study
measured it (chosen and measured on all dev rows), held out, beyond
recalibration, and on the fresh rows, each with its 95 % interval, and a verdict
that claims only what the interval supports (`verdict`). Every number comes from
the records; nothing is typed in.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .cells import defined, fmt_gain, fmt_k
from .load import Checkpoint, Run
from .summaries import method_summary, protocol_methods, reference_summary

__all__ = ["headline", "verdict"]


def verdict(lo: Optional[float], hi: Optional[float]) -> str:
    """What a 95 % interval of a gain supports: ``shown``, ``negative`` or ``not shown``."""
    if not (defined(lo) and defined(hi)):
        return "no interval"
    if lo > 0:
        return "shown (interval above 0)"
    if hi < 0:
        return "negative (interval below 0)"
    return "not shown (interval contains 0)"


def _gain(x: Optional[float], ci: Optional[Dict[str, Any]]) -> str:
    if not defined(x):
        return "n/a"
    if not ci:
        return f"{fmt_gain(x)} (no interval: record without per-row predictions)"
    return f"{fmt_gain(x)} [{fmt_gain(ci['lo'])}, {fmt_gain(ci['hi'])}]"


def _method_lines(ckpt: Checkpoint, method: str) -> List[str]:
    h = ckpt.heldouts[method]
    ref = reference_summary(h)
    held = method_summary(h, split=ckpt.split)["heldout"]
    n_all = h.baseline.rows["all"].n
    ab, ba = held["folds"]
    ks = f"k = {fmt_k(ab['best_k'])} / {fmt_k(ba['best_k'])}"
    beyond_ci = held.get("mean_beyond_recalibration_ci") or {}
    lines = [
        f"- {method}, chosen and measured on all {n_all} dev rows (the reference study's "
        f"protocol; optimistic, the choice saw the rows): {_gain(ref['gain'], ref['gain_ci'])} "
        f"at k = {fmt_k(ref['best_k'])}",
        f"- {method}, held out (chosen on one half of dev, measured on the other, both "
        f"ways; {ks}): {_gain(held['mean_gain'], held['mean_gain_ci'])}",
        f"- {method}, beyond recalibration ((masked + offset) − (unmasked + offset), "
        f"held out): {_gain(held['mean_beyond_recalibration'], beyond_ci or None)} — "
        f"{verdict(beyond_ci.get('lo'), beyond_ci.get('hi'))}",
    ]
    fresh = ckpt.fresh.get(method)
    if fresh is not None:
        s = fresh.summary(method)
        g, b = s["gain"], s["beyond_recalibration"]
        lines.append(
            f"- {method}, {s['rows']:,} fresh rows (all choices on dev, measured once): gain "
            f"{_gain(g['diff'], g)} at k = {fmt_k(s['best_k'])}, beyond recalibration "
            f"{_gain(b['diff'], b)} — {verdict(b['lo'], b['hi'])}"
        )
    return lines


def _recalibration_line(ckpt: Checkpoint, methods: List[str]) -> Optional[str]:
    if not methods:
        return None
    held = method_summary(ckpt.heldouts[methods[0]], split=ckpt.split)["heldout"]
    text = (
        "- one logit offset alone (the recalibration control), held out: "
        f"{_gain(held.get('mean_recalibration_alone'), held.get('mean_recalibration_alone_ci'))}"
    )
    fresh = next((ckpt.fresh[m] for m in methods if m in ckpt.fresh), None)
    if fresh is not None:
        a = fresh.summary(next(iter(fresh.methods)))["recalibration_alone"]
        text += f"; on the fresh rows: {_gain(a['diff'], a)}"
    return text


def headline(run: Run) -> List[str]:
    """The summary lines of every checkpoint with held-out records (accuracy points)."""
    out: List[str] = []
    for ckpt in run.checkpoints:
        methods = protocol_methods(ckpt)
        if not methods:
            continue
        base = ckpt.heldouts[methods[0]].baseline.rows["all"].accuracy
        out.append(
            f"{ckpt.name} (unmasked: {100 * base:.1f} % dev accuracy); gains in accuracy "
            "points, 95 % paired bootstrap intervals over the measured rows in brackets:"
        )
        for m in methods:
            out += _method_lines(ckpt, m)
        line = _recalibration_line(ckpt, methods)
        if line:
            out.append(line)
    return out
