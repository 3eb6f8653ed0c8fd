"""Losses: what a batch costs, as a function of the model's parameters.

A loss is any callable ``loss_fn(model, batch) -> scalar tensor``. The Hessian
needs nothing more. The generalised Gauss-Newton matrix also needs the split
into model outputs and a loss on those outputs: an `Objective` provides both.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HFClassification", "LossFn", "Objective", "batch_size", "default_loss"]

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
_IGNORE_INDEX = -100  # cross-entropy's (and transformers') ignored label


def batch_size(batch: Batch) -> int:
    """Number of rows in a batch: the length of its labels, else of its first tensor.

    The default weight of a batch's mean loss in a dataset mean. Losses that
    are not one per row (tokens, ignored labels) say otherwise through
    `Objective.batch_size` or a ``batch_size_fn``.
    """
    if isinstance(batch, Mapping):
        if isinstance(batch.get("labels"), torch.Tensor):
            return int(batch["labels"].shape[0])
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    raise ValueError(
        f"cannot tell the batch size of a {type(batch).__name__}: pass dicts of tensors "
        "with 'labels' or a leading batch dimension"
    )


class Objective:
    """A loss split into ``outputs(model, batch)`` and ``loss(outputs, batch)``.

    Calling it gives ``loss(outputs(model, batch), batch)``. The loss is a mean
    over what `batch_size` counts (rows unless ``batch_size`` says otherwise:
    tokens, non-ignored labels), so that a dataset's loss is the mean over all
    of them.
    """

    def __init__(
        self,
        outputs: Callable[[nn.Module, Batch], torch.Tensor],
        loss: Callable[[torch.Tensor, Batch], torch.Tensor],
        requires: tuple = (),
        batch_size: Optional[Callable[[Batch], float]] = None,
    ):
        self._outputs = outputs
        self._loss = loss
        self.requires = tuple(requires)
        self._batch_size = batch_size

    def batch_size(self, batch: Batch) -> float:
        """What the loss of `batch` is a mean over: its weight in a dataset's mean."""
        if self._batch_size is not None:
            return self._batch_size(batch)
        return batch_size(batch)

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._outputs(model, batch)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._loss(outputs, batch)

    def check_batch(self, batch: Batch, where: str) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{where} is a {type(batch).__name__}; batches must be dicts of tensors"
            )
        missing = [k for k in self.requires if k not in batch]
        if missing:
            raise ValueError(
                f"{where} has no {', '.join(map(repr, missing))} "
                f"(keys: {sorted(batch)}); the loss needs them"
            )

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss(self.outputs(model, batch), batch)


class HFClassification(Objective):
    """The loss Hugging Face's ``*ForSequenceClassification`` models compute with labels.

    Mean cross-entropy for single-label classification, mean squared error for
    regression (``num_labels == 1``), mean binary cross-entropy with logits for
    multi-label problems, following ``config.problem_type`` as transformers does.
    Each is a mean over label entries (cross-entropy: those not equal to -100,
    which it ignores), so `batch_size` counts those: token-level labels weigh
    a batch by its labelled tokens, not its rows.
    """

    def __init__(self, problem_type: Optional[str] = None):
        self.problem_type = problem_type
        super().__init__(self._hf_outputs, self._hf_loss, requires=("labels",))

    @staticmethod
    def _hf_outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out[0]

    def batch_size(self, batch: Batch) -> float:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            return batch_size(batch)
        if self.problem_type in (None, "single_label_classification") and not (
            labels.is_floating_point() or labels.is_complex()
        ):
            return int((labels != _IGNORE_INDEX).sum())
        return labels.numel()

    def _resolve(self, logits: torch.Tensor, labels: torch.Tensor) -> str:
        if self.problem_type is not None:
            return self.problem_type
        if logits.shape[-1] == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def _hf_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        kind = self._resolve(logits, labels)
        if kind == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        if kind == "single_label_classification":
            return F.cross_entropy(
                logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=_IGNORE_INDEX
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def default_loss(model: nn.Module) -> Objective:
    """The default objective for a model: Hugging Face classification's loss."""
    config = getattr(model, "config", None)
    return HFClassification(getattr(config, "problem_type", None))


def check_batches(loss_fn: Any, batches, what: str) -> None:
    """Checks that can run before any work: batch type and the keys the loss needs."""
    checker = getattr(loss_fn, "check_batch", None)
    for i, b in enumerate(batches):
        if checker is not None:
            checker(b, f"{what} batch {i}")
        elif not isinstance(b, (Mapping, tuple, list)):
            raise TypeError(f"{what} batch {i} is a {type(b).__name__}, not a dict of tensors")
