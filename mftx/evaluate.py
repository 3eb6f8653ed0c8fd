"""Accuracy and loss of a classifier, and exact effects of zeroing single parameters."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .core.params import ParamSpace
from .ops import Candidates

__all__ = ["ZeroingEvaluator", "evaluate", "length_sorted"]


def length_sorted(examples: Sequence, tokenizer: Any) -> List:
    """Examples ordered by token count, so batches need little padding (metrics don't care)."""
    lengths = [len(ids) for ids in tokenizer([s for s, _ in examples])["input_ids"]]
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    return [examples[i] for i in order]


def _inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Accuracy and mean cross-entropy over `batches` (model in eval mode while it runs)."""
    was_training = model.training
    model.eval()
    try:
        correct, loss_sum, n = 0, 0.0, 0
        for b in batches:
            logits = model(**_inputs(b)).logits
            labels = b["labels"]
            loss_sum += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no samples to evaluate")
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}


def _layer_list(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer block list (encoder.layer for BERT-like models), if found."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in (
            "layer",
            "layers",
            "h",
            "block",
        ):
            if best is None or len(mod) > len(best):
                best = mod
    return best


class ZeroingEvaluator:
    """The actual change of mean validation loss when one parameter is zeroed alone.

    Works on a private copy of the model (in `dtype`, float64 by default: the
    changes are tiny). For a parameter inside block L of the model's layer list,
    blocks before L return their cached outputs instead of recomputing, so a
    query costs the forward pass from block L on.
    """

    def __init__(
        self,
        model: nn.Module,
        space: ParamSpace,
        batches: Sequence[Dict[str, torch.Tensor]],
        dtype: torch.dtype = torch.float64,
    ):
        self.model = copy.deepcopy(model).to(dtype).eval()
        own = dict(self.model.named_parameters())
        self.params = [own[n] for n in space.names]
        self.batches = list(batches)
        self.layers = _layer_list(self.model)
        self.block_of = self._blocks()
        self._cache: List[List[Any]] = []
        self._batch = 0
        self.base = self._loss(start=0, record=self.layers is not None)

    def _blocks(self) -> List[int]:
        if self.layers is None:
            return [0] * len(self.params)
        where = {}
        for i, block in enumerate(self.layers):
            for p in block.parameters():
                where[id(p)] = i
        return [where.get(id(p), 0) for p in self.params]

    @torch.inference_mode()
    def _loss(self, start: int, record: bool = False) -> float:
        hooks = []
        if record:
            self._cache = [[] for _ in self.layers]
            for i, block in enumerate(self.layers):
                hook = lambda m, a, out, i=i: self._cache[i].append(out)  # noqa: E731
                hooks.append(block.register_forward_hook(hook))
        for i in range(start):  # blocks before `start` replay their cached outputs
            self.layers[i].forward = lambda *a, i=i, **k: self._cache[i][self._batch]
        try:
            total, n = 0.0, 0
            for j, b in enumerate(self.batches):
                self._batch = j
                logits = self.model(**_inputs(b)).logits
                total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                n += b["labels"].shape[0]
        finally:
            for h in hooks:
                h.remove()
            for i in range(start):
                del self.layers[i].forward  # back to the class's method
        return total / n

    def delta(self, tensor_index: int, flat_index: int) -> float:
        """L_val(θ with entry zeroed) − L_val(θ)."""
        c = Candidates(torch.tensor([tensor_index]), torch.tensor([flat_index]), torch.zeros(1))
        saved = ops.mask_(self.params, c)
        try:
            return self._loss(start=self.block_of[tensor_index]) - self.base
        finally:
            ops.restore_(self.params, c, saved)
