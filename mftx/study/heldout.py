"""Held-out evaluation: which rows choose, which rows measure.

A score chosen on the rows it is evaluated on measures fit to those rows. The
held-out protocol splits the dev set into two seeded halves (stratified by
label): on half A the validation gradient, the scores that need it and the best
k are chosen, and accuracy is measured on half B; then the roles swap.

Everything here works on per-row logits from one forward pass over all dev rows
(`DevRows.logits`), so a masked model is evaluated once and measured on any row
set: accuracy, loss, predicted-class shares, and accuracy after a logit offset
(`best_offset`) chosen on other rows — the one-scalar recalibration control.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DevRows",
    "RowSplit",
    "best_offset",
    "decode_rows",
    "encode_rows",
    "row_metrics",
    "two_fold",
]


def _digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(indices)).encode()).hexdigest()


def encode_rows(values: torch.Tensor) -> str:
    """Per-row class numbers (0..255) as text for a JSON record: one byte per row, base64."""
    v = torch.as_tensor(values).reshape(-1)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 255):
        raise ValueError("per-row values must lie in 0..255 to take one byte each")
    return base64.b64encode(bytes(v.to(torch.uint8).tolist())).decode("ascii")


def decode_rows(text: str) -> torch.Tensor:
    """The inverse of `encode_rows`: an int64 tensor, one value per row."""
    return torch.tensor(list(base64.b64decode(text.encode("ascii"), validate=True)),
                        dtype=torch.int64)  # fmt: skip


@dataclass(frozen=True)
class RowSplit:
    """Two disjoint halves of ``n`` rows (row numbers in file order), from a seed."""

    a: Tuple[int, ...]
    b: Tuple[int, ...]
    seed: int
    n: int

    def __post_init__(self) -> None:
        sa, sb = set(self.a), set(self.b)
        if sa & sb:
            raise ValueError(f"split halves overlap in {len(sa & sb)} rows")
        if sa | sb != set(range(self.n)):
            raise ValueError(f"split halves do not cover rows 0..{self.n - 1} exactly")
        if not self.a or not self.b:
            raise ValueError("both halves of a split need at least one row")

    def folds(self) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]:
        """(name, selection rows, evaluation rows) for both directions."""
        return [("A->B", self.a, self.b), ("B->A", self.b, self.a)]

    def half(self, name: str) -> Tuple[int, ...]:
        if name not in ("A", "B"):
            raise ValueError(f"half must be 'A' or 'B', got {name!r}")
        return self.a if name == "A" else self.b

    def to_json(self) -> Dict[str, Any]:
        return {
            "seed": self.seed, "n": self.n, "a": list(self.a), "b": list(self.b),
            "sha256_a": _digest(self.a), "sha256_b": _digest(self.b),
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> RowSplit:
        split = cls(tuple(d["a"]), tuple(d["b"]), int(d["seed"]), int(d["n"]))
        for half in ("a", "b"):
            want = d.get(f"sha256_{half}")
            if want is not None and want != _digest(getattr(split, half)):
                raise ValueError(f"split half {half.upper()}: indices do not match their hash")
        return split


def two_fold(labels: Sequence[int], seed: int) -> RowSplit:
    """Seeded halves of the rows, stratified by label (each class split as evenly as it can)."""
    labels = [int(y) for y in labels]
    if len(labels) < 2:
        raise ValueError(f"a two-fold split needs at least 2 rows, got {len(labels)}")
    gen = torch.Generator().manual_seed(seed)
    a: List[int] = []
    b: List[int] = []
    for cls in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == cls]
        perm = torch.randperm(len(rows), generator=gen).tolist()
        shuffled = [rows[j] for j in perm]
        # Alternate which half gets the odd row out, so halves stay balanced in size.
        cut = (len(shuffled) + (len(a) <= len(b))) // 2
        a += shuffled[:cut]
        b += shuffled[cut:]
    return RowSplit(tuple(sorted(a)), tuple(sorted(b)), seed, len(labels))


class DevRows:
    """The dev rows, batched once by length, with per-row logits in file order."""

    def __init__(self, examples: Sequence, tokenizer: Any, batch_size: int = 64,
                 max_length: int = 64):  # fmt: skip
        from ..data import make_batches

        self.examples = list(examples)
        if not self.examples:
            raise ValueError("no dev rows")
        self.labels = torch.tensor([int(y) for _, y in self.examples], dtype=torch.int64)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.order = self._length_order(range(len(self.examples)))
        self.batches = make_batches(
            [self.examples[i] for i in self.order], tokenizer, batch_size, max_length=max_length
        )
        self._make_batches = make_batches

    def _length_order(self, rows) -> List[int]:
        rows = list(rows)
        ids = self.tokenizer([self.examples[i][0] for i in rows])["input_ids"]
        return [rows[j] for j in sorted(range(len(rows)), key=lambda j: (len(ids[j]), rows[j]))]

    def __len__(self) -> int:
        return len(self.examples)

    def batches_for(self, rows: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        """Batches of the given rows (for a validation gradient on one half)."""
        order = self._length_order(rows)
        return self._make_batches(
            [self.examples[i] for i in order], self.tokenizer, self.batch_size,
            max_length=self.max_length,
        )  # fmt: skip

    @torch.inference_mode()
    def logits(self, model: nn.Module) -> torch.Tensor:
        """float64 logits of every row, in file order (model in eval mode while it runs)."""
        was_training = model.training
        model.eval()
        try:
            parts = []
            for b in self.batches:
                out = model(**{k: v for k, v in b.items() if k != "labels"})
                parts.append((out.logits if hasattr(out, "logits") else out[0]).double())
        finally:
            model.train(was_training)
        sorted_logits = torch.cat(parts)
        logits = torch.empty_like(sorted_logits)
        logits[torch.tensor(self.order)] = sorted_logits
        return logits


def _rows(n: int, rows: Optional[Sequence[int]]) -> torch.Tensor:
    if rows is None:
        return torch.arange(n)
    idx = torch.as_tensor(list(rows), dtype=torch.int64)
    if idx.numel() == 0:
        raise ValueError("empty row set")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"row indices must lie in [0, {n}), got {int(idx.min())}..{int(idx.max())}"
        )
    return idx


def row_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: Optional[Sequence[int]] = None,
    offset: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Accuracy, mean cross-entropy and predicted-class shares on `rows` (all if None).

    `offset` (one value per class) is added to the logits first: accuracy then
    measures a recalibrated classifier (the loss too).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [rows, classes] and labels [rows], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    idx = _rows(len(labels), rows)
    z = logits[idx].double()
    y = labels[idx]
    if offset is not None:
        z = z + torch.as_tensor(offset, dtype=z.dtype)
    pred = z.argmax(-1)
    shares = torch.bincount(pred, minlength=z.shape[1]).double() / len(y)
    return {
        "accuracy": float((pred == y).double().mean()),
        "loss": float(F.cross_entropy(z, y)),
        "predicted_share": shares.tolist(),
        "n": len(y),
    }


def _accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    return float((z.argmax(-1) == y).double().mean())


def best_offset(
    logits: torch.Tensor, labels: torch.Tensor, rows: Optional[Sequence[int]] = None,
    rounds: int = 3,
) -> torch.Tensor:  # fmt: skip
    """The logit offset (one value per class, class 0's fixed at 0) that maximises accuracy.

    Two classes: an exact search over the thresholds of the logit difference
    (the midpoints between consecutive distinct values); among equally accurate
    offsets the one of smallest magnitude. More classes: coordinate ascent with
    the same exact search per class (`rounds` sweeps), started from zero and from
    each single-class optimum; the most accurate result is kept, so it is at
    least as good as any shift of one class alone.
    """
    idx = _rows(len(labels), rows)
    z = logits[idx].double()
    y = labels[idx]
    c = z.shape[1]
    if c < 2:
        raise ValueError("recalibration needs at least two classes")
    zero = torch.zeros(c, dtype=torch.float64)
    if c == 2:
        zero[1] = _best_coordinate(z, y, 1, zero[1])
        return zero
    starts = [zero]
    for j in range(1, c):
        s = zero.clone()
        s[j] = _best_coordinate(z, y, j, s[j])
        starts.append(s)
    best, best_acc = zero, -1.0
    for off in starts:
        off = off.clone()
        for _ in range(rounds):
            for j in range(1, c):
                off[j] = _best_coordinate(z + off - _unit(c, j) * off[j], y, j, torch.zeros(()))
        acc = _accuracy(z + off, y)
        if acc > best_acc + 1e-12:
            best, best_acc = off, acc
    return best


def _unit(c: int, j: int) -> torch.Tensor:
    e = torch.zeros(c, dtype=torch.float64)
    e[j] = 1.0
    return e


def _best_coordinate(z: torch.Tensor, y: torch.Tensor, j: int, current: torch.Tensor) -> float:
    """Best additive change of class j's offset, returned as the new offset value."""
    others = z.clone()
    others[:, j] = -float("inf")
    margin = z[:, j] - others.max(-1).values  # class j wins iff margin + delta > 0
    m = torch.unique(margin)  # sorted
    # Candidate deltas: below every margin, midpoints, above every margin, and "no change".
    mids = (m[:-1] + m[1:]) / 2 if len(m) > 1 else m[:0]
    cands = torch.cat([-m[:1] + 1.0, -mids, -m[-1:] - 1.0, torch.zeros(1, dtype=m.dtype)])
    best, best_acc = 0.0, -1.0
    for d in sorted(cands.tolist(), key=abs):
        zz = z.clone()
        zz[:, j] += d
        acc = _accuracy(zz, y)
        if acc > best_acc + 1e-12:
            best, best_acc = d, acc
    return float(current) + best
