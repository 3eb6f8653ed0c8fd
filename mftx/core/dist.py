"""Data-parallel bookkeeping over `torch.distributed` ranks.

Every rank holds a shard of the batches. The *union* the ranks stand for is
their batches in rank order (rank 0's first): a global batch or example index
counts along that order, so sampling by global index (`sample_local`,
`example_offset`) gives the same draws whatever the world size when the data
are split into contiguous pieces (`shard`). Sums over ranks (`all_sum`) make
every mean a mean over the union, each example counted once.

Everything here is collective: every rank must call it, in the same order.
With `enabled` False it is the one-process identity.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, TypeVar

import torch

__all__ = [
    "active",
    "all_sum",
    "counts",
    "example_offset",
    "rank_world",
    "sample_indices",
    "sample_local",
    "shard",
    "shard_bounds",
    "uniforms",
]

T = TypeVar("T")


def active(flag: Optional[bool] = None) -> bool:
    """Whether to reduce over ranks: `flag`, else whether a process group is initialised."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if flag is None:
        return initialised
    if flag and not initialised:
        raise RuntimeError(
            "distributed=True but torch.distributed has no process group: start the processes "
            "with torchrun and call torch.distributed.init_process_group first"
        )
    return bool(flag)


def rank_world(enabled: bool = True) -> Tuple[int, int]:
    """(rank, world size); (0, 1) when not `enabled`."""
    if not enabled:
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _device() -> torch.device:
    """Where collectives run: CUDA for NCCL, the XLA device for "xla", else the CPU (gloo)."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "xla":
        import torch_xla

        return torch_xla.device()
    return torch.device("cpu")


def all_sum(t: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """`t` summed over ranks (in place where the collective can work on `t` itself)."""
    if not enabled:
        return t
    dev = _device()
    if t.device == dev:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t
    buf = t.to(dev)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    t.copy_(buf)
    return t


def counts(n: float, enabled: bool = True) -> List[float]:
    """`n` of every rank, in rank order (an all-gather of one number)."""
    if not enabled:
        return [float(n)]
    _, world = rank_world()
    mine = torch.tensor([float(n)], dtype=torch.float64, device=_device())
    out = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(out, mine)
    return [float(o[0]) for o in out]


def shard_bounds(n: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous piece of n items (the first n % world get one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {rank}, {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], rank: Optional[int] = None, world: Optional[int] = None) -> List[T]:
    """This rank's contiguous piece of `items` (sizes differ by at most one).

    The pieces in rank order are `items` again, so a data-parallel run over them
    equals one process on `items` (see the module docstring). `rank` and `world`
    default to the initialised process group's.
    """
    if rank is None or world is None:
        r, w = rank_world(active())
        rank = r if rank is None else rank
        world = w if world is None else world
    start, stop = shard_bounds(len(items), rank, world)
    return list(items[start:stop])


def global_range(n_local: int, enabled: bool = True) -> Tuple[int, int]:
    """(offset of this rank's first item in the union, items in the union)."""
    if not enabled:
        return 0, int(n_local)
    rank, _ = rank_world()
    c = [int(x) for x in counts(n_local)]
    return sum(c[:rank]), sum(c)


def example_offset(n_local: int, enabled: bool = True) -> int:
    """The global index of this rank's first example (`n_local`: examples here)."""
    return global_range(n_local, enabled)[0]


def sample_indices(n: int, k: Optional[int], seed: int) -> Sequence[int]:
    """k batch indices out of n, drawn with a seed (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def sample_local(
    n_local: int, k: Optional[int], seed: int, enabled: bool = True
) -> Tuple[List[int], int]:
    """`sample_indices` over the union's batches: (the local indices of the drawn batches
    this rank holds, how many were drawn over all ranks)."""
    offset, total = global_range(n_local, enabled)
    chosen = sample_indices(total, k, seed)
    return [i - offset for i in chosen if offset <= i < offset + n_local], len(chosen)


_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniforms(seed: int, start: int, n: int) -> torch.Tensor:
    """n float64 uniforms in [0, 1), one per global index start … start+n−1 (counter-based:
    the value at an index depends on `seed` and the index only, not on who draws it)."""
    key = _splitmix64(int(seed) & _MASK)
    vals = [(_splitmix64(key ^ _splitmix64(start + i)) >> 11) * 2.0**-53 for i in range(n)]
    return torch.tensor(vals, dtype=torch.float64)
