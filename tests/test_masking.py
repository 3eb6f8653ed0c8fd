"""Masking stacks, sweeps and single-parameter zeroing on real (tiny) models."""

from __future__ import annotations

import copy

import pytest
import torch
from _toys import tiny_bert_problem

import mftx
from mftx import masking
from mftx.evaluate import ZeroingEvaluator, evaluate


@pytest.fixture
def bert():
    model, train, val, _ = tiny_bert_problem()
    model = model.float()
    with torch.no_grad():  # random init leaves biases at zero: make every weight nonzero
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.where(p == 0, 0.02 + 0.02 * torch.rand(p.shape, generator=gen), 0.0))
    space = mftx.select_params(model)
    return model, train, val, space


def _bits(space):
    return [p.detach().clone().view(torch.int32) for p in space.params]


def test_fingerprint_sees_signed_zero():
    a = torch.zeros(3)
    b = a.clone()
    b[1] = -0.0
    assert torch.equal(a, b)  # equal as numbers ...
    assert masking.fingerprint([a]) != masking.fingerprint([b])  # ... not as bits


def test_mask_stack_restores_bitwise_in_reverse_order(bert):
    model, train, val, space = bert
    before = _bits(space)
    scores = mftx.score(model, method="magnitude", params=space, progress=False)
    cands = scores.candidates(500)
    with masking.MaskStack(space) as stack:
        stack.push(cands[:100])
        stack.push(cands[50:500])  # overlapping on purpose
        assert stack.n_masked == 550
        flat = torch.cat([p.detach().reshape(-1) for p in space.params])
        assert int((flat == 0).sum()) >= 500
    for a, b in zip(_bits(space), before):
        assert torch.equal(a, b)


def test_mask_stack_restores_after_an_exception(bert):
    model, train, val, space = bert
    before = masking.fingerprint(space.params)
    cands = mftx.score(model, method="magnitude", params=space, progress=False).candidates(50)
    with pytest.raises(RuntimeError, match="boom"):
        with masking.masked(space, cands):
            raise RuntimeError("boom")
    assert masking.fingerprint(space.params) == before


def test_masked_weights_change_the_model_and_autograd_notices(bert):
    model, train, val, space = bert
    loss = model(**train[0]).loss  # graph holds the weights
    cands = mftx.score(model, method="magnitude", params=space, progress=False).candidates(50)
    with masking.masked(space, cands):
        if mftx.ops.HAS_CPP:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


def test_sweep_is_incremental_and_restores(bert):
    model, train, val, space = bert
    s = mftx.score(model, method="magnitude", params=space, progress=False)
    cands = s.candidates(10_000)
    seen = []

    def ev():
        flat = torch.cat([p.detach().reshape(-1) for p in space.params])
        seen.append(int((flat == 0).sum()))
        return evaluate(model, val)

    before = masking.fingerprint(space.params)
    points = masking.sweep(space, cands, [50, 10, 400, 10**9], ev, progress=False)
    assert [p["k"] for p in points] == [10, 50, 400, 10**9]
    assert [p["removed"] for p in points] == [10, 50, 400, space.numel]
    # Exactly the first k are zero (magnitude: the smallest first, none zero before).
    assert seen[:3] == [10, 50, 400] and seen[3] == space.numel
    assert masking.fingerprint(space.params) == before
    base = evaluate(model, val)
    assert points[0]["n"] == base["n"]


def test_sweep_resumes_without_re_evaluating(bert):
    model, train, val, space = bert
    cands = mftx.score(model, method="magnitude", params=space, progress=False).candidates(100)
    calls = []
    done = {10: {"k": 10, "removed": 10, "accuracy": 0.5, "loss": 1.0}}
    points = masking.sweep(
        space, cands, [10, 20], lambda: calls.append(1) or {"accuracy": 0.0, "loss": 0.0},
        done=done, progress=False,
    )  # fmt: skip
    assert len(calls) == 1 and points[0] == done[10] and points[1]["k"] == 20


def test_sweep_rejects_bad_ks(bert):
    space = bert[3]
    c = mftx.ops.Candidates.empty()
    with pytest.raises(ValueError, match="k must be >= 1"):
        masking.sweep(space, c, [0], dict, progress=False)
    with pytest.raises(ValueError, match="no k given"):
        masking.sweep(space, c, [], dict, progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zeroing_evaluator_matches_brute_force(bert, dtype):
    model, train, val, space = bert
    z = ZeroingEvaluator(model, space, val, dtype=dtype)
    assert z.layers is not None and max(z.block_of) == 1  # block caching is in use
    for t in range(len(space)):
        if space.params[t].dim() < 2:
            continue
        f = 7
        ref = copy.deepcopy(model).to(dtype)
        own = dict(ref.named_parameters())
        base = evaluate(ref, val)["loss"]
        with torch.no_grad():
            own[space.names[t]].view(-1)[f] = 0
        want = evaluate(ref, val)["loss"] - base
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert z.delta(t, f) == pytest.approx(want, abs=tol)
    # The evaluator never touches the caller's model.
    assert all(p.dtype == torch.float32 for p in model.parameters())
