"""`mftx analyze` over several processes (``torchrun … -m mftx analyze …``): stages spread.

Every process runs the same analysis, in the same order, on the whole data.
Independent work is spread with `spread(keys, fn)`: key i is computed whole by
process i mod world (every stage `fn` creates is that process's), each process
then waits for the other keys' owners to say they are done and reads their
records back exactly as a resumed run takes up records on disk. So while one
process fits EK-FAC, another sweeps the gradient rule. Stages created outside
`spread` are dealt out round-robin in the order the analysis creates them: the
owner computes and writes it; every other process waits until the owner has gone
past it (created the next stage, or finished) and then takes up its record; such
stages run one after another. Each result is computed whole by one process, with the
code and data of a single-process run, so the records are the same bytes as a
single-process run's (timings aside); each file has exactly one writer; rank 0
writes the run index (``analysis.json``) once every process is done.

A stage uses only results created before it, so the waits end: the owner of the
n-th stage reaches it once stages 0 … n−1 are done, and every process runs the
same `spread` regions in the same order. Each process says how far it
got in a small file of ``OUT/.parallel-<start>/``; a process that fails ends the
run (torchrun stops the others).

No process group stays open during the analysis (its scoring calls must not
become data-parallel: each owner scores on the whole data); one is opened at
the start only to agree on the run's start time, which names that folder.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from .. import fileio

__all__ = ["Split", "current", "from_env", "reset", "spread"]

K = TypeVar("K")
R = TypeVar("R")

#: Seconds between looks at another process's progress.
POLL = 0.05
_DONE = -1


@dataclass
class Split:
    """This process's place in the run: rank, world size, the run's start (ns), its output."""

    rank: int
    world: int
    start_ns: int
    out: Optional[Path] = None
    created: int = field(default=0)
    #: Inside `spread`: "own" (this process computes every stage created) or "read"
    #: (stages are read from disk, written by their owner); None: round-robin stages.
    mode: Optional[str] = None
    regions: int = 0

    @property
    def writer(self) -> bool:
        """Whether this process writes the run-level files (rank 0)."""
        return self.rank == 0

    @property
    def folder(self) -> Path:
        if self.out is None:
            raise RuntimeError("the parallel run has no output folder yet (attach(out) first)")
        return self.out / f".parallel-{self.start_ns}"

    def attach(self, out: Path) -> None:
        self.out = Path(out)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _say(self, value: int) -> None:
        fileio.atomic_write(self.folder / f"rank{self.rank}", str(value))

    def _heard(self, rank: int) -> int:
        try:
            return int((self.folder / f"rank{rank}").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def assign(self) -> Tuple[int, int]:
        """(owner, index) of the next stage created (round-robin); says how far this got.
        Inside `spread`: (this rank, -1) when owning, (-1, -1) when reading back."""
        if self.mode is not None:
            return (self.rank if self.mode == "own" else -1), -1
        index = self.created
        self.created += 1
        self._say(self.created)
        return index % self.world, index

    def wait_past(self, owner: int, index: int) -> None:
        """Until `owner` has created stage index+1, entered a `spread` region after it, or
        finished."""
        while True:
            got = self._heard(owner)
            if got == _DONE or got > index + 1:
                return
            time.sleep(POLL)

    @contextmanager
    def _in(self, mode: str) -> Iterator[None]:
        before, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = before

    def _marker(self, region: int, i: int) -> Path:
        return self.folder / f"region{region}-{i}"

    def finish(self) -> None:
        """Say this process is done; rank 0 waits for every other one, then tidies up."""
        self._say(_DONE)
        if self.writer:
            for r in range(1, self.world):
                while self._heard(r) != _DONE:
                    time.sleep(POLL)
            shutil.rmtree(self.folder, ignore_errors=True)


_current: Optional[Split] = None


def spread(keys: Sequence[K], fn: Callable[[K], R]) -> List[R]:
    """[fn(k) for k in keys], with key i computed by process i mod world under torchrun.

    `fn` must be a function of its key and of results made before the call (not of
    the other keys' results): its stages are computed whole by the key's owner, and
    every process reads the others' back once their owners are done. In one process,
    or inside another `spread`, it is the plain loop.
    """
    split = current()
    if split is None or split.mode is not None:
        return [fn(k) for k in keys]
    region = split.regions
    split.regions += 1
    # Every stage created so far is done here: say so, or a process waiting for this
    # one's last round-robin stage would wait while this one waits in the region.
    split._say(split.created + 1)
    out: List[Optional[R]] = [None] * len(keys)
    mine = [i for i in range(len(keys)) if i % split.world == split.rank]
    for i in mine:
        with split._in("own"):
            out[i] = fn(keys[i])
        fileio.atomic_write(split._marker(region, i), "done")
    for i, key in enumerate(keys):
        if i in mine:
            continue
        while not split._marker(region, i).is_file():
            time.sleep(POLL)
        with split._in("read"):
            out[i] = fn(key)
    return out  # type: ignore[return-value]


def current() -> Optional[Split]:
    """The split of this process, None in a single-process run."""
    return _current


def reset() -> None:
    global _current
    _current = None


def from_env() -> Optional[Split]:
    """Join the run torchrun started (``WORLD_SIZE`` > 1 in the environment), else None.

    Opens a gloo process group to agree on the start time, and closes it again.
    """
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = None
        return None
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        start = torch.tensor([time.time_ns()], dtype=torch.int64)
        dist.broadcast(start, src=0)
        _current = Split(dist.get_rank(), dist.get_world_size(), int(start[0]))
    finally:
        dist.destroy_process_group()
    return _current
