"""Data-parallel scoring: torchrun with 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toys import mlp_problem

import mftx

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.mark.parametrize("method", ["influence", "gradient"])
def test_two_ranks_match_one_process_on_the_union(tmp_path, method):
    pytest.importorskip("torch.distributed.run")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), str(tmp_path), method,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [mftx.Scores.load(tmp_path / f"{method}-rank{i}.safetensors") for i in range(2)]

    model, train, val, objective = mlp_problem(n_batches=4)  # the same data as the workers
    space = mftx.select_params(model, exclude=None)
    single = mftx.score(
        model, train, val, method=method, params=space, loss_fn=objective, curvature="ggn",
        damping=0.5, tol=1e-13, max_iter=500, progress=False, distributed=False,
    )  # fmt: skip
    want = torch.cat([single.scores[n].reshape(-1) for n in single.names])
    for s in ranks:
        got = torch.cat([s.scores[n].reshape(-1) for n in s.names])
        assert got.dtype == torch.float64
        assert float((got - want).norm() / want.norm()) < 1e-6
    # Every rank returns the same scores.
    for n in ranks[0].names:
        assert torch.equal(ranks[0].scores[n], ranks[1].scores[n])
