"""Group fidelity tables: predicted against actual loss change of zeroing whole subsets.

From ``groupfid.json`` (`mftx.study.groups.GroupFidelity`): per method and group of
subsets, Spearman and Pearson across subsets with bootstrap 95 % intervals, and
the mean predicted and actual change. Groups are named as in
`mftx.study.groups.summarize`: ``random k=<k>``, ``random`` (pooled), ``all``,
``top-<method> k=<k>``, ``flagged-<method> k=<k>``, taylor's
``random+quadratic``, and ``random k=<k> <direction>`` where both halves were measured.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from .cells import defined, fmt_ci, fmt_loss
from .load import Run, order_methods
from .tables import MISSING, fmt_count, markdown_table

__all__ = [
    "GROUP_MEAN_HEADERS",
    "group_correlation_table",
    "group_direction",
    "group_direction_table",
    "group_mean_table",
    "group_origin",
    "group_rows",
]

_GROUP = re.compile(r"^(random|top|flagged)(?:-.+?)? k=(\d+)(?: (all|A→A|B→B|B→A))?$")
_DIRECTIONS = ("A→B", "B→A", "all", "A→A", "B→B")
_ORDER = {"random": 0, "random-pooled": 1, "all": 2, "random+quadratic": 3, "top": 4, "flagged": 5}


def group_origin(group: str) -> Tuple[str, Optional[int]]:
    """(origin, k) of a group name: ``("top", 20)`` for ``top-taylor k=20``;
    ``("random-pooled", None)`` for ``random``; other names as they are, k None."""
    m = _GROUP.match(group)
    if m:
        return m.group(1), int(m.group(2))
    return ("random-pooled" if group == "random" else group), None


def group_direction(group: str) -> str:
    """Which score set predicted and which rows measured: ``A→B`` (the groups without a
    direction), or the suffix of ``random k=<k> <direction>`` (``all``, ``A→A``, …)."""
    m = _GROUP.match(group)
    return (m.group(3) if m else None) or "A→B"


def _interval(stats: Dict[str, Any], name: str) -> List[Optional[float]]:
    iv = stats.get(f"{name}_interval") or [None, None]
    return [x if defined(x) else None for x in iv]


def group_rows(run: Run) -> List[Dict[str, Any]]:
    """One row per checkpoint, method and group of subsets (long format)."""
    rows = []
    for ckpt in run.checkpoints:
        gf = ckpt.group_fidelity
        if gf is None:
            continue
        for method in order_methods(gf.summary):
            groups = gf.summary[method]

            def key(g: str) -> Tuple[int, int, str]:
                origin, k = group_origin(g)
                return (
                    _ORDER.get(origin, len(_ORDER)),
                    k or 0,
                    _DIRECTIONS.index(group_direction(g)),
                    g,
                )

            for g in sorted(groups, key=key):
                s = groups[g]
                origin, k = group_origin(g)
                sp, pe = _interval(s, "spearman"), _interval(s, "pearson")
                rows.append({
                    "checkpoint": ckpt.name, "method": method, "group": g, "origin": origin,
                    "k": k, "direction": group_direction(g), "n": s.get("n"), "rows": gf.rows,
                    "spearman": s.get("spearman"), "spearman_lo": sp[0], "spearman_hi": sp[1],
                    "pearson": s.get("pearson"), "pearson_lo": pe[0], "pearson_hi": pe[1],
                    "mean_predicted": s.get("mean_predicted"),
                    "mean_actual": s.get("mean_actual"),
                })  # fmt: skip
    return rows


def _ci(row: Optional[Dict[str, Any]], name: str) -> str:
    if row is None:
        return MISSING
    return fmt_ci(row[name], [row[f"{name}_lo"], row[f"{name}_hi"]])


def _index(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str], Dict[str, Any]]:
    return {(r["checkpoint"], r["method"], r["group"]): r for r in rows}


def _random_ks(rows: List[Dict[str, Any]]) -> List[int]:
    return sorted({r["k"] for r in rows if r["origin"] == "random"})


def group_correlation_table(run: Run) -> str:
    """Markdown: Spearman per random-subset size and pooled, Pearson pooled ("" if none).

    Taylor with the quadratic group term gets a row of its own (pooled only).
    """
    rows = [r for r in group_rows(run) if r["direction"] == "A→B"]
    if not rows:
        return ""
    ks = _random_ks(rows)
    headers = ["checkpoint", "method", *[f"Spearman, random k = {k:,}" for k in ks],
               "Spearman, random pooled", "Pearson, random pooled", "Spearman, all subsets",
               "random subsets"]  # fmt: skip
    at = _index(rows)
    body = []
    for ckpt, method in dict.fromkeys((r["checkpoint"], r["method"]) for r in rows):
        pooled = at.get((ckpt, method, "random"))
        cells = [ckpt, method, *[_ci(at.get((ckpt, method, f"random k={k}")), "spearman")
                                 for k in ks]]  # fmt: skip
        cells += [_ci(pooled, "spearman"), _ci(pooled, "pearson"),
                  _ci(at.get((ckpt, method, "all")), "spearman"),
                  MISSING if pooled is None else fmt_count(pooled["n"])]  # fmt: skip
        body.append(cells)
        quad = at.get((ckpt, method, "random+quadratic"))
        if quad is not None:
            body.append([ckpt, f"{method} + ½ θ_Sᵀ H θ_S", *[MISSING] * len(ks),
                         _ci(quad, "spearman"), _ci(quad, "pearson"), MISSING,
                         fmt_count(quad["n"])])  # fmt: skip
    return markdown_table(headers, body, left=2)


def group_direction_table(run: Run) -> str:
    """Markdown: Spearman per random-subset size in-sample (all rows, A→A, B→B) and across
    halves (A→B, B→A), bootstrap intervals ("" when no record measured both halves)."""
    rows = [r for r in group_rows(run) if r["origin"] == "random" and r["k"] is not None]
    if not any(r["direction"] != "A→B" for r in rows):
        return ""
    at = {(r["checkpoint"], r["method"], r["k"], r["direction"]): r for r in rows}
    order = ("all", "A→A", "B→B", "A→B", "B→A")
    headers = ["checkpoint", "method", "k", "in-sample, all rows", "in-sample A→A",
               "in-sample B→B", "across A→B", "across B→A", "subsets"]  # fmt: skip
    body = []
    keys = dict.fromkeys((r["checkpoint"], r["method"], r["k"]) for r in rows)
    for ckpt, method, k in keys:
        if not any((ckpt, method, k, d) in at for d in order if d != "A→B"):
            continue
        first = at.get((ckpt, method, k, "all")) or at[(ckpt, method, k, "A→B")]
        body.append([ckpt, method, fmt_count(k),
                     *[_ci(at.get((ckpt, method, k, d)), "spearman") for d in order],
                     fmt_count(first["n"])])  # fmt: skip
    return markdown_table(headers, body, left=2)


GROUP_MEAN_HEADERS = (
    "checkpoint", "method", "k", "random: predicted", "random: actual", "top-k: predicted",
    "top-k: actual", "flagged: predicted", "flagged: actual",
)  # fmt: skip


def group_mean_table(run: Run) -> str:
    """Markdown: mean predicted and actual loss change of random, top-k and flagged subsets."""
    rows = [r for r in group_rows(run) if r["direction"] == "A→B"]
    if not rows:
        return ""
    cells: Dict[Tuple[str, str], Dict[int, Dict[str, Dict[str, Any]]]] = {}
    for r in rows:  # (checkpoint, method) in table order
        by_k = cells.setdefault((r["checkpoint"], r["method"]), {})
        if r["k"] is not None:
            by_k.setdefault(r["k"], {})[r["origin"]] = r
    body = []
    for (ckpt, method), by_k in cells.items():
        for k in sorted(by_k):
            line = [ckpt, method, fmt_count(k)]
            for origin in ("random", "top", "flagged"):
                r = by_k[k].get(origin)
                line += (
                    [MISSING, MISSING] if r is None
                    else [fmt_loss(r["mean_predicted"]), fmt_loss(r["mean_actual"])]
                )  # fmt: skip
            body.append(line)
    return markdown_table(GROUP_MEAN_HEADERS, body, left=2)
