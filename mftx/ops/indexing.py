"""Positions in a list of tensors: global flat index <-> (tensor index, flat index).

A list of tensors is indexed as if concatenated flat, in order: entry ``f`` of
tensor ``t`` has global index ``starts[t] + f``. `FlatIndex` converts both ways,
on Python ints or int64 tensors of any length.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

__all__ = ["FlatIndex"]

Index = Union[int, torch.Tensor]


class FlatIndex:
    """The layout of tensors with `numels` entries each, concatenated flat."""

    def __init__(self, numels: Sequence[int]):
        self.numels = tuple(int(n) for n in numels)
        if any(n < 0 for n in self.numels):
            raise ValueError(f"numels must be >= 0, got {self.numels}")
        counts = torch.tensor(self.numels, dtype=torch.int64)
        self.ends = counts.cumsum(0)
        self.starts = self.ends - counts
        self.total = int(self.ends[-1]) if self.numels else 0

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> FlatIndex:
        """The layout of `tensors` (their `numel` in order)."""
        return cls([t.numel() for t in tensors])

    def to_global(self, tensor_index: Index, flat_index: Index) -> Index:
        """Global index of entry `flat_index` of tensor `tensor_index` (same type as given)."""
        if isinstance(tensor_index, torch.Tensor):
            t = tensor_index.to(torch.int64)
            return self.starts.to(t.device)[t] + flat_index
        self._check_entry(int(tensor_index), int(flat_index))
        return int(self.starts[tensor_index]) + int(flat_index)

    def split(self, global_index: Index) -> Tuple[Index, Index]:
        """(tensor index, flat index) of a global index (ints, or int64 tensors elementwise)."""
        if isinstance(global_index, torch.Tensor):
            if global_index.is_floating_point() or global_index.is_complex():
                raise TypeError(f"global indices must be integers, got {global_index.dtype}")
            g = global_index.to(torch.int64)
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.total):
                raise IndexError(f"global index out of range [0, {self.total})")
            ends = self.ends.to(g.device)
            t = torch.searchsorted(ends, g, right=True)
            return t, g - self.starts.to(g.device)[t]
        g = int(global_index)
        if not 0 <= g < self.total:
            raise IndexError(f"global index {g} out of range [0, {self.total})")
        t = int(torch.searchsorted(self.ends, torch.tensor(g), right=True))
        return t, g - int(self.starts[t])

    def _check_entry(self, t: int, f: int) -> None:
        if not 0 <= t < len(self.numels):
            raise IndexError(f"tensor index {t} out of range [0, {len(self.numels)})")
        if not 0 <= f < self.numels[t]:
            raise IndexError(f"flat index {f} out of range [0, {self.numels[t]}) of tensor {t}")
