"""Where the removed parameters live: shares and enrichment by module kind, layer, weight/bias.

From ``location-<method>.json`` (`mftx.study.location.Location`). For each method the
shown sets are its largest top-k set and its flagged set. A key's share of a
set is its count over the set's size; its enrichment is that share over the
key's share of all analysed entries (1 = as often as chance would put it there).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..location import KINDS, Location
from .cells import fmt_ratio
from .load import Run, order_methods
from .tables import MISSING, fmt_accuracy, fmt_count, markdown_table

__all__ = [
    "TABLES",
    "kind_table",
    "layer_kinds",
    "layer_table",
    "location_rows",
    "shown_sets",
    "sorted_layers",
]

#: The location tables a row can come from (`mftx.study.location.location_table`'s keys).
TABLES = ("kind", "layer", "leaf", "layer_kind")


def shown_sets(loc: Location) -> List[str]:
    """The largest ``top-<k>`` set, then ``flagged`` when the method has one."""
    tops = [s for s in loc.sets if s.startswith("top-") and s[4:].isdigit()]
    out = [max(tops, key=lambda s: int(s[4:]))] if tops else []
    return out + (["flagged"] if "flagged" in loc.sets else [])


def _rows_of(ckpt: str, method: str, name: str, loc: Location, table: str) -> List[Dict]:
    counts = loc.sets[name].get(table, {})
    totals = loc.totals.get(table, {})
    n_set, n_all = sum(counts.values()), sum(totals.values())
    rows = []
    for key in sorted(set(totals) | set(counts)):
        c, a = counts.get(key, 0), totals.get(key, 0)
        share = c / n_set if n_set else None
        a_share = a / n_all if n_all else None
        rows.append({
            "checkpoint": ckpt, "method": method, "set": name, "table": table, "key": key,
            "count": c, "set_total": n_set, "share": share, "analysed": a,
            "analysed_total": n_all, "analysed_share": a_share,
            "enrichment": share / a_share if share is not None and a_share else None,
        })  # fmt: skip
    return rows


def location_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint, method, shown set, table and key: counts, shares and enrichment."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.locations):
            loc = ckpt.locations[method]
            for name in shown_sets(loc):
                for table in TABLES:
                    rows += _rows_of(ckpt.name, method, name, loc, table)
    return rows


def _ordered_kinds(keys: Iterable[str]) -> List[str]:
    keys = set(keys)
    return [k for k in KINDS if k in keys] + sorted(keys - set(KINDS))


def sorted_layers(keys: Iterable[str]) -> List[str]:
    """Layer keys in block order, ``none`` (outside the blocks) last."""
    return sorted(set(keys), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def layer_kinds(
    loc: Location, name: str
) -> Tuple[List[str], List[str], Dict[Tuple[str, str], Any]]:
    """(layers, kinds, enrichment per (layer, kind)) of set `name`: the heat map's cells.

    Cells with no analysed entries are absent; enrichment is None for an empty set.
    """
    counts = loc.sets[name].get("layer_kind", {})
    totals = loc.totals.get("layer_kind", {})
    n_set, n_all = sum(counts.values()), sum(totals.values())
    cells: Dict[Tuple[str, str], Any] = {}
    for key, a in totals.items():
        layer, _, kind = key.partition("/")
        if a and n_set and n_all:
            cells[(layer, kind)] = (counts.get(key, 0) / n_set) / (a / n_all)
        else:
            cells[(layer, kind)] = None
    layers = sorted_layers(lay for lay, _ in cells)
    kinds = _ordered_kinds(kind for _, kind in cells)
    return layers, kinds, cells


def _cell(row: Optional[Dict[str, Any]]) -> str:
    if row is None:
        return MISSING
    return f"{fmt_ratio(row['enrichment'])} ({fmt_accuracy(row['share'])})"


def _grouped(rows: List[Dict[str, Any]], table: str):
    """{(checkpoint, method, set): {key: row}} of one table, in row order."""
    out: Dict[Tuple[str, str, str], Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        if r["table"] == table:
            out.setdefault((r["checkpoint"], r["method"], r["set"]), {})[r["key"]] = r
    return out


def kind_table(run: Run) -> str:
    """Markdown: enrichment (share) by module kind and by weight/bias ("" without records)."""
    rows = location_rows(run)
    if not rows:
        return ""
    kinds = _ordered_kinds(r["key"] for r in rows if r["table"] == "kind")
    leaves = _grouped(rows, "leaf")
    headers = ["checkpoint", "method", "set", "entries", *kinds, "weights", "biases"]
    body = []
    for (ckpt, method, name), by in _grouped(rows, "kind").items():
        size = next(iter(by.values()))["set_total"]
        leaf = leaves.get((ckpt, method, name), {})
        body.append([ckpt, method, name, fmt_count(size), *[_cell(by.get(k)) for k in kinds],
                     _cell(leaf.get("weight")), _cell(leaf.get("bias"))])  # fmt: skip
    return markdown_table(headers, body, left=3)


def layer_table(run: Run) -> str:
    """Markdown: enrichment (share) by transformer block ("" without records)."""
    rows = location_rows(run)
    if not rows:
        return ""
    layers = sorted_layers(r["key"] for r in rows if r["table"] == "layer")
    names = [f"layer {k}" if k.isdigit() else "outside blocks" for k in layers]
    headers = ["checkpoint", "method", "set", *names]
    body = [[ckpt, method, name, *[_cell(by.get(k)) for k in layers]]
            for (ckpt, method, name), by in _grouped(rows, "layer").items()]  # fmt: skip
    return markdown_table(headers, body, left=3)
