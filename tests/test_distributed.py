"""Data-parallel scoring: torchrun with 2 and 3 CPU processes (gloo, uneven contiguous shards,
some empty) against one process on the union, for every method, solver and the spectrum."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_cases import CASES, PROBLEMS, flat, run

import mftx
from mftx.core import dist

WORKER = Path(__file__).with_name("_dist_worker.py")


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 600):
    """`python -m torch.distributed.run --standalone` in a subprocess, one thread per rank."""
    pytest.importorskip("torch.distributed.run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _load(path: Path):
    if path.suffix == ".json":
        return mftx.Spectrum.load(path)
    return mftx.Scores.load(path)


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_on_uneven_shards_equals_one_process(tmp_path, world):
    torchrun(world, WORKER, str(tmp_path), ",".join(CASES))
    for name, (problem, kind, _) in CASES.items():
        _, train, val, _, _ = PROBLEMS[problem]()
        single = run(name, train, val, distributed=False)
        want = flat(single)
        suffix = "json" if kind == "spectrum" else "safetensors"
        ranks = [_load(tmp_path / f"{name}-rank{r}.{suffix}") for r in range(world)]
        for r, got in enumerate(ranks):
            g = flat(got)
            assert g.dtype == torch.float64 and g.shape == want.shape, name
            err = float((g - want).norm() / want.norm())
            assert err < 1e-10, f"{name}: rank {r} is {err:.2e} from one process"
            # Every rank returns exactly the same numbers.
            assert torch.equal(g, flat(ranks[0])), f"{name}: rank {r} differs from rank 0"
        if kind == "score":  # the records count the union, not the shard
            for key in ("n_train_batches", "n_val_batches"):
                assert ranks[-1].config[key] == single.config[key], (name, key)
            for key in ("hvp_batches_used", "damping"):
                if key in single.stats:
                    assert ranks[-1].stats[key] == pytest.approx(single.stats[key], rel=1e-10)
        else:
            assert ranks[-1].info["hvp_batches"] == single.info["hvp_batches"]


def test_shards_are_contiguous_and_cover_the_items():
    items = list(range(11))
    for world in (1, 2, 3, 4, 12):
        pieces = [dist.shard(items, r, world) for r in range(world)]
        assert [x for piece in pieces for x in piece] == items
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        dist.shard(items, 3, 3)


def test_sampled_labels_do_not_depend_on_the_batching():
    model, train, _, objective, space = PROBLEMS["mlp"]()
    a = mftx.ekfac.sampled_batches(model, train, objective, seed=4)
    whole = {
        "x": torch.cat([b["x"] for b in train]),
        "labels": torch.cat([b["labels"] for b in train]),
    }
    b = mftx.ekfac.sampled_batches(model, [whole], objective, seed=4)
    ya = torch.cat([x["labels"] for x in a])
    assert torch.equal(ya, b[0]["labels"])
    # A later piece keyed by its offset draws the same labels as within the whole.
    tail = mftx.ekfac.sampled_batches(model, train[2:], objective, seed=4, offset=7)
    assert torch.equal(torch.cat([x["labels"] for x in tail]), ya[7:])
    other = mftx.ekfac.sampled_batches(model, [whole], objective, seed=5)
    assert not torch.equal(other[0]["labels"], ya)


def test_uniforms_are_uniform_and_keyed_by_index():
    u = dist.uniforms(0, 0, 20000)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(dist.uniforms(0, 100, 50), u[100:150])
    assert not torch.equal(dist.uniforms(1, 0, 50), u[:50])


def test_distributed_true_without_a_process_group_is_refused():
    model, train, val, objective, space = PROBLEMS["mlp"]()
    with pytest.raises(RuntimeError, match="no process group"):
        mftx.score(model, train, val, method="taylor", params=space, loss_fn=objective,
                   distributed=True, progress=False)  # fmt: skip


def test_one_rank_group_equals_no_group():
    """A gloo group of size 1 in this process: collectives run and change nothing."""
    import torch.distributed as tdist

    model, train, val, objective, space = PROBLEMS["mlp"]()
    kw = {"params": space, "loss_fn": objective, "progress": False}
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        grouped = [mftx.score(model, train, val, method=m, **kw) for m in ("taylor", "gradient")]
        grouped.append(run("ekfac-sampled", train, val, distributed=True))
    finally:
        tdist.destroy_process_group()
    alone = [mftx.score(model, train, val, method=m, **kw) for m in ("taylor", "gradient")]
    alone.append(run("ekfac-sampled", train, val, distributed=False))
    for a, b in zip(grouped, alone):
        assert torch.equal(flat(a), flat(b))
