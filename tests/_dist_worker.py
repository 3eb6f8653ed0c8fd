"""Worker for test_distributed.py: every case of _dist_cases on this rank's shard (torchrun)."""

import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from _dist_cases import CASES, PROBLEMS, run

from mftx.core.dist import shard


def main(out: Path, names) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in names:
        _, train, val, _, _ = PROBLEMS[CASES[name][0]]()
        result = run(name, shard(train), shard(val), distributed=True)
        suffix = "json" if CASES[name][1] == "spectrum" else "safetensors"
        result.save(out / f"{name}-rank{rank}.{suffix}")
    dist.barrier()  # nobody tears gloo down while another rank still talks
    dist.destroy_process_group()
    # Every result is on disk; leave without C++ static destructors, where gloo's threads
    # aborted once under load ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
