"""`Scores`: one score per analysed parameter, and which parameters to remove first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import fileio, ops
from .ops import Candidates

__all__ = ["METHODS", "Scores"]

#: For each method: the data it uses (training and/or validation batches), whether
#: candidates are the largest scores (else the smallest), and its flag rule (threshold,
#: below) or None. The sign convention lives here only.
METHODS: Dict[str, Dict[str, Any]] = {
    "gradient": {
        "uses": ("train",),
        "largest": True,
        "flag": (0.0, False),
        "flag_label": "detrimental",
        "help": "|θ| − |θ − lr·g_train|: how far one SGD step moves θ toward zero; > 0 flagged",
    },
    "influence": {
        "uses": ("train", "val"),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−θ ⊙ (H + λI)⁻¹ ∇L_val: predicted change of validation loss; < 0 flagged",
    },
    "taylor": {
        "uses": ("val",),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−g_val ⊙ θ: first-order change of validation loss when zeroing; < 0 flagged",
    },
    "obd": {
        "uses": ("val",),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−g_val ⊙ θ + ½ diag(H_val) ⊙ θ²: second-order change of validation loss; < 0 flagged",
    },
    "magnitude": {
        "uses": (),
        "largest": False,
        "flag": None,
        "flag_label": None,
        "help": "|θ|: smallest first; ranks only, flags nothing",
    },
}

_FORMAT = "mftx.scores/1"


class Scores:
    """Per-parameter scores of one method, keyed by parameter name.

    `candidates(k)` gives the k parameters most worth removing, first first;
    `flagged()` the method's flagged set (gradient: detrimental; influence,
    taylor, obd: beneficial to remove), both as `Candidates` whose tensor
    indices follow `names`.
    """

    def __init__(
        self,
        method: str,
        scores: Dict[str, torch.Tensor],
        config: Optional[Dict[str, Any]] = None,
        stats: Optional[Dict[str, Any]] = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
        if not scores:
            raise ValueError("Scores needs at least one score tensor")
        self.method = method
        self.scores = dict(scores)
        self.config = dict(config or {})
        self.stats = dict(stats or {})
        self._fused_flagged: Optional[Candidates] = None

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.scores)

    def tensors(self) -> List[torch.Tensor]:
        return list(self.scores.values())

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.scores.values())

    def __repr__(self) -> str:
        return f"Scores(method={self.method!r}, tensors={len(self.scores)}, numel={self.numel})"

    def candidates(self, k: int) -> Candidates:
        """The k parameters most worth removing, most first."""
        return ops.topk(self.tensors(), k, largest=METHODS[self.method]["largest"])

    def flagged(self) -> Candidates:
        """The method's flagged set, most extreme first."""
        rule = METHODS[self.method]["flag"]
        if rule is None:
            raise ValueError(
                f"method {self.method!r} ranks parameters but flags none; use candidates(k)"
            )
        if self._fused_flagged is not None:
            return self._fused_flagged
        threshold, below = rule
        return ops.select(self.tensors(), threshold, below=below)

    def locate(self, cands: Candidates) -> List[Tuple[str, Tuple[int, ...], float]]:
        """(parameter name, multi-index, score) of each candidate."""
        names = self.names
        out = []
        for t, f, v in cands:
            shape = self.scores[names[t]].shape
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(f), shape))
            out.append((names[t], idx, v))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        """Write a safetensors file; method, config and stats go in its JSON metadata."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "names": list(self.names),
            "config": self.config,
            "stats": self.stats,
        }
        tensors = {
            f"score.{i}": t.detach().contiguous().cpu() for i, t in enumerate(self.tensors())
        }
        return fileio.write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Union[str, Path]) -> Scores:
        path = Path(path)
        tensors, meta = fileio.read_safetensors(path, _FORMAT, "scores")
        keys = [f"score.{i}" for i in range(len(meta.get("names", ())))]
        if "names" not in meta or set(keys) != set(tensors):
            raise fileio.FileFormatError(path, "mftx scores whose tensors do not match 'names'")
        scores = {n: tensors[k] for n, k in zip(meta["names"], keys)}
        return cls(meta["method"], scores, meta["config"], meta["stats"])


def from_space(method: str, names: Sequence[str], tensors: Sequence[torch.Tensor], **kw) -> Scores:
    return Scores(method, dict(zip(names, tensors)), **kw)
