"""Worker for test_distributed.py: influence scores from a data-parallel shard (torchrun)."""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from _toys import mlp_problem

import mftx


def main(out: Path, method: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, train, val, objective = mlp_problem(n_batches=4)
    space = mftx.select_params(model, exclude=None)
    scores = mftx.score(
        model, train[rank::world], val[rank::world], method=method, params=space,
        loss_fn=objective, curvature="ggn", damping=0.5, tol=1e-13, max_iter=500, progress=False,
    )  # fmt: skip
    scores.save(out / f"{method}-rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
