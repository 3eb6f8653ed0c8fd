"""FSDP2-sharded scoring (2 ranks, gloo, CPU) against the unsharded model in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fsdp_cases import METHODS, K, problem
from test_distributed import torchrun

import mftx
from mftx import ops

WORKER = Path(__file__).with_name("_fsdp_worker.py")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(2, WORKER, str(out))
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_each_rank_holds_its_rows_of_the_single_process_scores(sharded_run, name):
    model, train, val, objective = problem()
    space = mftx.select_params(model, exclude=None)
    single = mftx.score(model, train, val, params=space, loss_fn=objective, progress=False,
                        **METHODS[name])  # fmt: skip
    rows_seen = {n: [] for n in single.names}
    for rank in range(2):
        got = mftx.Scores.load(sharded_run / f"{name}-rank{rank}.safetensors")
        shard = got.stats["shard"]
        assert shard["rank"] == rank and shard["world"] == 2
        for n in single.names:
            r0, r1 = shard["rows"][n]
            rows_seen[n].append((r0, r1))
            want = single.scores[n][r0:r1]
            assert got.scores[n].shape == want.shape
            torch.testing.assert_close(got.scores[n], want, rtol=1e-10, atol=1e-14)
        report = json.loads((sharded_run / f"report-rank{rank}.json").read_text())[name]
        # Top-k over the shards, merged: the single-process op's candidates, tie order included.
        c = single.candidates(K)
        assert report["tensor_index"] == c.tensor_index.tolist(), name
        assert report["flat_index"] == c.flat_index.tolist(), name
    for n, rr in rows_seen.items():  # the two ranks' rows tile the tensor
        assert rr[0][0] == 0 and rr[0][1] == rr[1][0] and rr[1][1] == single.scores[n].shape[0]


def test_magnitude_ties_across_ranks_follow_the_op_order(sharded_run):
    model, *_ = problem()
    space = mftx.select_params(model, exclude=None)
    c = ops.topk([p.detach().abs() for p in space.params], 4, largest=False)
    # Four entries of |θ| = 1e-3, two on each rank (rows 0, 3 | 6 of layer 0; row 2 of layer 2).
    assert c.tensor_index.tolist() == [0, 0, 0, 2] and c.flat_index.tolist() == [1, 19, 32, 14]
    report = json.loads((sharded_run / "report-rank0.json").read_text())["magnitude"]
    assert report["flat_index"][:4] == [1, 19, 32, 14]


def test_masking_on_shards_equals_masking_the_whole_model(sharded_run):
    model, train, val, objective = problem()
    space = mftx.select_params(model, exclude=None)
    single = mftx.score(model, train, val, params=space, loss_fn=objective, progress=False,
                        **METHODS["gradient"])  # fmt: skip
    with mftx.masked(space, single.candidates(K)), torch.no_grad():
        want = [float(objective(model, b)) for b in val]
    for rank in range(2):
        report = json.loads((sharded_run / f"report-rank{rank}.json").read_text())
        assert report["masked_val_losses"] == pytest.approx(want, rel=1e-12)
        assert report["restored"] is True


def test_each_rank_holds_about_a_world_th_of_params_and_scores(sharded_run):
    total = 0
    for rank in range(2):
        report = json.loads((sharded_run / f"report-rank{rank}.json").read_text())
        local, whole = report["gradient"]["local_numel"], report["gradient"]["numel"]
        assert report["local_score_numel"] == local
        # torch.chunk rows: 7 = 4 + 3 and 3 = 2 + 1; each rank holds at most ceil(rows/2).
        assert local <= whole / 2 + 5 + 7 + 1 + 1
        total += local
    assert total == whole


def test_curvature_products_are_refused_by_name(sharded_run):
    report = json.loads((sharded_run / "report-rank0.json").read_text())
    msg = report["refusal"]
    assert msg is not None and "solver='minres'" in msg and "solver='ekfac'" in msg
    assert "distributed=True" in msg
