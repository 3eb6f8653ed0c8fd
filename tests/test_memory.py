"""cache_graphs="auto": the graph-size measurement and the decision, with injected memory."""

from __future__ import annotations

import pytest
import torch
from _toys import mean_loss_fn, mlp_problem, tiny_bert_problem
from torch.func import hessian

import mftx
from mftx.curvature import memory


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize(
    ("first", "sizes", "available", "budget", "cached", "estimate"),
    [
        (100, [10, 20, 10], 1000, 0.5, True, 400),  # 400 <= 500
        (100, [10, 20, 10], 700, 0.5, False, 400),  # 400 > 350
        (100, [10, 20, 10], 800, 0.5, True, 400),  # exactly at the budget
        (100, [10], 150, 1.0, True, 100),
        (100, [10, 10], None, 0.5, False, 200),  # free memory unknown: do not cache
    ],
)
def test_cache_fits_decides_from_the_numbers(first, sizes, available, budget, cached, estimate):
    d = memory.cache_fits(first, sizes, available, budget)
    assert d["cached"] is cached and d["estimated_bytes"] == estimate
    assert d["available_bytes"] == available and d["budget"] == budget


def test_saved_bytes_counts_activations_not_resident_tensors():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(100, 32)
    with memory.saved_bytes([w, x]) as counter:
        h = torch.tanh(x @ w.T)  # saves x (resident: skipped) and tanh's output (100 x 64)
        (h * h).sum()  # saves h twice: one storage
    assert counter.bytes == 100 * 64 * 4
    with memory.saved_bytes() as everything:
        torch.tanh(x @ w.T)
    assert everything.bytes == (100 * 64 + 100 * 32) * 4  # w is not needed: x has no grad


def test_graph_size_grows_with_the_batch():
    model, _, _, obj = mlp_problem()
    space = mftx.select_params(model)
    sizes = []
    for n in (50, 100):
        batch = {"x": torch.randn(n, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (n,))}
        op = mftx.Curvature(model, space, [batch], obj, cache_graphs="auto")
        op._decide_caching(0, op.params)
        sizes.append(op.cache_decision["first_batch_bytes"])
    assert 1.8 < sizes[1] / sizes[0] < 2.0  # activations double; gradients stay


@pytest.fixture(scope="module")
def bert():
    model, train, val, space = tiny_bert_problem()
    theta = space.flatten(space.detached())
    return model, train, space, hessian(mean_loss_fn(model, space, train, None))(theta).detach()


@pytest.mark.parametrize(("free", "cached"), [(1 << 40, True), (1, False)])
@pytest.mark.parametrize("mode", ["double-backward", "rev-rev"])
def test_auto_caching_follows_the_free_memory(bert, monkeypatch, free, cached, mode):
    model, train, space, H = bert
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    op = mftx.Curvature(model, space, train, mftx.HFClassification(), mode=mode,
                        cache_graphs="auto")  # fmt: skip
    v = torch.randn(space.numel, dtype=torch.float64)
    for _ in range(2):
        assert rel(op.matvec(v), H @ v) < 1e-10
    d = op.cache_decision
    assert op.caching is cached and d["cached"] is cached and d["available_bytes"] == free
    assert len(op._graphs) == (len(train) if cached else 0)
    sizes = [memory.input_numel(b) for b in train]
    assert d["estimated_bytes"] == int(d["first_batch_bytes"] * sum(sizes) / sizes[0])


def test_auto_caching_is_recorded_in_the_scores(bert, monkeypatch):
    model, train, space, H = bert
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 40)
    s = mftx.score(model, train, train, params=space, solver="minres", damping=5.0, cache_graphs="auto",
                   cache_budget=0.25, progress=False)  # fmt: skip
    assert s.stats["graph_cache"]["cached"] and s.stats["graph_cache"]["budget"] == 0.25


def test_auto_caching_settings_are_checked(bert):
    model, train, space, _ = bert
    with pytest.raises(ValueError, match="backend='eager'"):
        mftx.Curvature(model, space, train, mftx.HFClassification(), backend="compile",
                       cache_graphs="auto")  # fmt: skip
    with pytest.raises(ValueError, match="cache_budget"):
        mftx.score(model, train, train, params=space, cache_graphs="auto", cache_budget=0.0,
                   progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="cache_graphs must be one of"):
        mftx.score(model, train, train, params=space, cache_graphs="yes", progress=False)


def test_available_bytes_on_this_host():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert memory.available_bytes(torch.device("meta")) is None
