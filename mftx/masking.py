"""Masking parameters in place and undoing it bit for bit.

`MaskStack` applies candidate lists one on top of another and restores them in
reverse order; `masked` is the one-shot context manager; `sweep` evaluates a
model after masking the top-k candidates for a growing list of k, masking
incrementally, and checks with a fingerprint that the weights come back
bitwise unchanged.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import ops
from .core.params import ParamSpace
from .ops import Candidates

__all__ = ["MaskStack", "check_ks", "fingerprint", "masked", "sweep"]


def fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, shapes and dtypes: equal iff bitwise equal."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class MaskStack:
    """Masks applied in layers over the parameters of a `ParamSpace`.

    ``push(cands)`` zeroes the candidates' entries and remembers their values;
    ``pop()`` undoes the last push; leaving the context (or ``restore_all()``)
    undoes every push, last first, restoring the weights bit for bit.
    """

    def __init__(self, space: ParamSpace):
        self.space = space
        self.tensors = list(space.params)
        self._stack: List[tuple] = []

    def __len__(self) -> int:
        return len(self._stack)

    @property
    def n_masked(self) -> int:
        return sum(len(c) for c, _ in self._stack)

    def push(self, cands: Candidates) -> None:
        saved = ops.mask_(self.tensors, cands)
        self._stack.append((cands, saved))

    def pop(self) -> Candidates:
        cands, saved = self._stack.pop()
        ops.restore_(self.tensors, cands, saved)
        return cands

    def restore_all(self) -> None:
        while self._stack:
            self.pop()

    def __enter__(self) -> MaskStack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore_all()


@contextmanager
def masked(space: ParamSpace, cands: Candidates) -> Iterator[MaskStack]:
    """Zero `cands` in the parameters of `space` for the duration of the block."""
    with MaskStack(space) as stack:
        stack.push(cands)
        yield stack


def check_ks(ks: Sequence[int]) -> List[int]:
    """Sorted, de-duplicated list of positive ks (errors name the bad value)."""
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out.append(k)
    if not out:
        raise ValueError("no k given: the sweep needs at least one k")
    return sorted(set(out))


def sweep(
    space: ParamSpace,
    cands: Candidates,
    ks: Sequence[int],
    evaluate: Callable[[], Dict[str, float]],
    done: Optional[Dict[int, Dict[str, Any]]] = None,
    on_point: Optional[Callable[[Dict[str, Any]], None]] = None,
    progress: bool = True,
    desc: str = "sweep",
) -> List[Dict[str, Any]]:
    """Evaluate after masking the top-k candidates, for each k (ascending).

    Masks grow incrementally (cands[:k1], then cands[k1:k2], ...). Points in
    `done` (k -> point, from an interrupted run) are not evaluated again;
    `on_point` is called with every new point (to save progress). Raises
    RuntimeError if the weights do not come back bitwise unchanged.
    """
    ks = check_ks(ks)
    done = done or {}
    before = fingerprint(space.params)
    points = []
    with MaskStack(space) as stack:
        applied = 0
        for k in tqdm(ks, desc=desc, disable=not progress, leave=False):
            removed = min(k, len(cands))
            if k in done:
                points.append(done[k])
                continue
            if removed > applied:
                stack.push(cands[applied:removed])
                applied = removed
            point = {"k": k, "removed": removed, **evaluate()}
            points.append(point)
            if on_point is not None:
                on_point(point)
    if fingerprint(space.params) != before:
        raise RuntimeError("masking sweep: the weights did not come back bit for bit")
    return points
