"""`mftx analyze` over several processes (``torchrun … -m mftx analyze …``): stages spread.

Every process runs the same analysis, in the same order, on the whole data. The
resumable stages (`mftx.study.stages.Stage`) are dealt out round-robin in the
order the analysis creates them: the owner of a stage computes and writes it;
every other process waits until the owner has gone past it (created the next
stage, or finished) and then takes up its record exactly as a resumed run takes
up a record on disk. Each result is computed whole by one process, with the
code and data of a single-process run, so the records are the same bytes as a
single-process run's (timings aside); each file has exactly one writer; rank 0
writes the run index (``analysis.json``) once every process is done.

A stage uses only results created before it, so the waits end: the owner of the
n-th stage reaches it once stages 0 … n−1 are done. Each process says how far it
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from .. import fileio

__all__ = ["Split", "current", "from_env", "reset"]

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
        """(owner, index) of the next stage created (round-robin); says how far this got."""
        index = self.created
        self.created += 1
        self._say(self.created)
        return index % self.world, index

    def wait_past(self, owner: int, index: int) -> None:
        """Until `owner` has created stage index+1 or finished."""
        while True:
            got = self._heard(owner)
            if got == _DONE or got > index + 1:
                return
            time.sleep(POLL)

    def finish(self) -> None:
        """Say this process is done; rank 0 waits for every other one, then tidies up."""
        self._say(_DONE)
        if self.writer:
            for r in range(1, self.world):
                while self._heard(r) != _DONE:
                    time.sleep(POLL)
            shutil.rmtree(self.folder, ignore_errors=True)


_current: Optional[Split] = None


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
