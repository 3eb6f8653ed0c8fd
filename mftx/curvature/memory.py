"""What a retained autograd graph costs, what memory is free, and whether caching fits.

`Curvature(cache_graphs="auto")` keeps each batch's first-order graph (one
backward pass per product instead of a forward and two backward passes) only
when the graphs of all its batches fit a budget: `cache_fits` with the first
batch's graph measured by `saved_bytes` and scaled to the others by input size,
against `budget` × the memory free before it was built (`available_bytes`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence

import torch

__all__ = ["SavedBytes", "available_bytes", "cache_fits", "input_numel", "saved_bytes"]


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on `device`: CUDA's free memory, else the host's
    MemAvailable (Linux) or available physical pages; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        self._skip = {_key(t) for t in resident}
        self._seen: set = set()
        self.bytes = 0

    def add(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self._skip or key in self._seen:
            return
        self._seen.add(key)
        self.bytes += t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


def _key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


@contextlib.contextmanager
def saved_bytes(resident: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Within the block, count what autograd saves for backward, except storages of
    `resident` tensors (parameters, inputs: they are kept anyway)."""
    counter = SavedBytes(resident)
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter


def input_numel(batch: Any) -> int:
    """Elements of a batch's tensors: how its activations scale."""
    values = batch.values() if isinstance(batch, dict) else batch
    if isinstance(values, torch.Tensor):
        return values.numel()
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor)) or 1


def cache_fits(
    first_bytes: int,
    sizes: Sequence[int],
    available: Optional[int],
    budget: float,
) -> Dict[str, Any]:
    """Whether the graphs of all batches fit: ``first_bytes`` (the first batch's graph)
    scaled by ``sizes`` (each batch's `input_numel`, the first one first), against
    ``budget`` × ``available``. Unknown free memory means no caching."""
    estimate = int(first_bytes * sum(sizes) / sizes[0]) if sizes else 0
    allowed = None if available is None else int(budget * available)
    return {
        "cached": allowed is not None and estimate <= allowed,
        "estimated_bytes": estimate,
        "first_batch_bytes": int(first_bytes),
        "available_bytes": available,
        "budget": budget,
    }
