"""Where parameters live: transformer block and module kind of each analysed entry.

`kind_of(name)` names the role of a parameter tensor from its module path,
across the families mftx supports (BERT/RoBERTa/ViT, DistilBERT, GPT-2,
Llama): ``query``, ``key``, ``value``, ``attn_out``, ``ffn_in`` (including
Llama's gate), ``ffn_out``, or ``other``. GPT-2's fused ``c_attn`` holds query,
key and value side by side; its entries are split by column. `layer_of(name)`
is the block index. `locate` counts a set of entries per (layer, kind, weight
or bias): the table behind "which layers hold the parameters removal helps".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..ops import Candidates
from .schema import Reader, register

__all__ = ["KINDS", "Location", "kind_of", "layer_of", "locate", "location_table", "space_table"]

KINDS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "other")

# (pattern on the module path, kind); the first match wins.
_RULES: Tuple[Tuple[str, str], ...] = (
    (r"\.(query|q_proj|q_lin)$", "query"),
    (r"\.(key|k_proj|k_lin)$", "key"),
    (r"\.(value|v_proj|v_lin)$", "value"),
    (r"attention\.output\.dense$|\.(o_proj|out_lin|out_proj)$|attn\.c_proj$", "attn_out"),
    (r"\.intermediate\.dense$|\.(gate_proj|up_proj|lin1|fc1)$|mlp\.c_fc$", "ffn_in"),
    (r"(?<!attention)\.output\.dense$|\.(down_proj|lin2|fc2)$|mlp\.c_proj$", "ffn_out"),
)
_FUSED_QKV = re.compile(r"attn\.c_attn$")
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def _module(name: str) -> Tuple[str, str]:
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def kind_of(name: str) -> str:
    """The role of parameter `name` (``"qkv"`` for GPT-2's fused projection)."""
    mod, _ = _module(name)
    if _FUSED_QKV.search(mod):
        return "qkv"
    for pattern, kind in _RULES:
        if re.search(pattern, mod):
            return kind
    return "other"


def layer_of(name: str) -> Optional[int]:
    """The transformer block index in `name`, None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _kind_counts(name: str, shape: torch.Size, flat: torch.Tensor) -> Dict[str, int]:
    """Entries of one tensor per kind; splits GPT-2's fused query/key/value by column."""
    kind = kind_of(name)
    if kind != "qkv":
        return {kind: len(flat)}
    cols = shape[-1]  # Conv1D weight [in, 3·hidden]; bias [3·hidden]
    part = torch.bincount((flat % cols) // (cols // 3), minlength=3).tolist()
    return {k: n for k, n in zip(("query", "key", "value"), part) if n}


def locate(
    names: Sequence[str], shapes: Sequence[torch.Size], cands: Candidates
) -> Dict[Tuple[Optional[int], str, str], int]:
    """Counts of entries per (layer, kind, "weight" | "bias" | other leaf name)."""
    if len(names) != len(shapes):
        raise ValueError("names and shapes differ in length")
    counts: Dict[Tuple[Optional[int], str, str], int] = {}
    if len(cands) == 0:
        return counts
    ti = cands.tensor_index
    if int(ti.max()) >= len(names) or int(ti.min()) < 0:
        raise ValueError(f"candidates name tensor {int(ti.max())} of {len(names)}")
    for t in torch.unique(ti).tolist():
        flat = cands.flat_index[ti == t]
        _, leaf = _module(names[t])
        layer = layer_of(names[t])
        for kind, n in _kind_counts(names[t], shapes[t], flat).items():
            key = (layer, kind, leaf)
            counts[key] = counts.get(key, 0) + n
    return counts


def _table(counts: Dict[Tuple[Optional[int], str, str], int]) -> Dict[str, Dict[str, int]]:
    by: Dict[str, Dict[str, int]] = {"layer": {}, "kind": {}, "leaf": {}, "layer_kind": {}}
    for (layer, kind, leaf), n in sorted(
        counts.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])
    ):
        lay = "none" if layer is None else str(layer)
        for table, key in (("layer", lay), ("kind", kind), ("leaf", leaf),
                           ("layer_kind", f"{lay}/{kind}")):  # fmt: skip
            by[table][key] = by[table].get(key, 0) + n
    return by


def location_table(
    names: Sequence[str], shapes: Sequence[torch.Size], cands: Candidates
) -> Dict[str, Dict[str, int]]:
    """Counts by layer, by kind, by weight/bias and by layer/kind (JSON-ready, string keys)."""
    return _table(locate(names, shapes, cands))


def space_table(names: Sequence[str], shapes: Sequence[torch.Size]) -> Dict[str, Dict[str, int]]:
    """`location_table` of every entry of the tensors (the denominators of shares)."""
    ti, fi = [], []
    for t, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        if kind_of(names[t]) == "qkv":
            fi.append(torch.arange(n))
            ti.append(torch.full((n,), t, dtype=torch.int64))
    counts: Dict[Tuple[Optional[int], str, str], int] = {}
    if ti:
        c = Candidates(torch.cat(ti), torch.cat(fi), torch.zeros(sum(len(x) for x in ti)))
        counts.update(locate(names, shapes, c))
    for t, shape in enumerate(shapes):
        if kind_of(names[t]) != "qkv":
            key = (layer_of(names[t]), kind_of(names[t]), _module(names[t])[1])
            counts[key] = counts.get(key, 0) + int(torch.Size(shape).numel())
    return _table(counts)


@register("location", 1, per_method=True)
@dataclass
class Location:
    """Where a method's top-k and flagged entries live, beside the analysed totals.

    ``sets``: set name (``top-<k>``, ``flagged``) -> `location_table`; ``totals``:
    the table of every analysed entry.
    """

    method: str
    sets: Dict[str, Dict[str, Dict[str, int]]]
    totals: Dict[str, Dict[str, int]]

    def to_json(self) -> Dict[str, Any]:
        return {"method": self.method, "sets": self.sets, "totals": self.totals}

    @classmethod
    def from_json(cls, r: Reader) -> Location:
        return cls(r.str("method"), r.dict("sets"), r.dict("totals"))
