"""backend="xla" on torch_xla's CPU PJRT device (run in the XLA environment, see .ci/run).

The first tests run anywhere (mask conversion, refusal messages); the rest need
torch_xla and are marked ``xla``.
"""

from __future__ import annotations

import os

import pytest
import torch
from _toys import tiny_bert_problem

import mftx
from mftx.backends import xla

try:  # torch_xla must own its device before autograd first runs in the process
    import torch_xla

    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla.device()
    HAS_XLA = True
except ImportError:
    HAS_XLA = False

needs_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (XLA environment)")


def test_xla_required_in_the_xla_stage():
    """CI's XLA stage sets MFTX_REQUIRE_XLA=1: a missing torch_xla must fail, not skip."""
    if os.environ.get("MFTX_REQUIRE_XLA") == "1":
        assert HAS_XLA, "MFTX_REQUIRE_XLA=1 but torch_xla did not import"


@pytest.fixture(scope="module")
def problem():
    model, train, val, _ = tiny_bert_problem()
    model = model.float()
    space = mftx.select_params(model, include=[r"layer\.1\."])
    return model, train, val, space


@pytest.fixture
def compile_counts(monkeypatch):
    """XLA's compile count after each solver sync (the start state, then every iteration)."""
    counts = []
    real_sync = xla.sync_state

    def recording_sync(tensors):
        real_sync(tensors)
        counts.append(xla.compile_count())

    monkeypatch.setattr(xla, "sync_state", recording_sync)
    return counts


def _flat(scores):
    return torch.cat([scores.scores[n].reshape(-1) for n in scores.names])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_additive_mask_gives_the_same_model_outputs(problem):
    model, train, val, _ = problem
    b = train[0]
    assert (b["attention_mask"] == 0).any()  # the batch has padding
    want = model(**b).logits
    got = model(**xla.to_device(b, torch.device("cpu"), torch.float32)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(HAS_XLA, reason="checks the message shown without torch_xla")
def test_missing_torch_xla_says_how_to_install(problem):
    model, train, val, space = problem
    with pytest.raises(ImportError, match=r"pip install torch==2\.9\.0 torch-xla==2\.9\.0"):
        mftx.score(model, train, val, params=space, backend="xla", solver="minres", progress=False)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"hvp_mode": "fwd-rev"}, "wrong Hessian-vector products on torch_xla"),
        ({"solver": "lissa"}, "fixed-iteration CG or MINRES only"),
        ({"solver": "lanczos"}, "fixed-iteration CG or MINRES only"),
        ({"solver": "ekfac"}, "fixed-iteration CG or MINRES only"),
        ({}, "not 'ekfac' \\(the default solver\\): pass solver='cg' or solver='minres'"),
        ({"damping": "auto", "solver": "minres"}, "damping='auto' runs Lanczos"),
        ({"xla_compile": True, "hvp_mode": "double-backward"}, "use hvp_mode='rev-rev'"),
    ],
)
def test_unsupported_xla_settings_are_refused(problem, opts, message):
    model, train, val, space = problem
    with pytest.raises(ValueError, match=message):
        mftx.score(model, train, val, params=space, backend="xla", progress=False, **opts)


@pytest.mark.xla
@needs_xla
@pytest.mark.parametrize("mode", ["rev-rev", "double-backward"])
def test_hvp_on_xla_equals_eager(problem, mode):
    model, train, _, space = problem
    v = torch.randn(space.numel, generator=torch.Generator().manual_seed(0))
    want = mftx.Curvature(model, space, train, mftx.HFClassification(), mode=mode).matvec(v)
    work, train_x, _, space_x = xla.prepare(model, train, [], space)
    op = mftx.Curvature(
        work, space_x, train_x, mftx.HFClassification(), mode=mode, check_finite=False
    )
    got = op.matvec(v.to(xla.device())).cpu()
    assert rel(got, want) < 1e-4


@pytest.mark.xla
@needs_xla
@pytest.mark.parametrize("compile_hvp", [False, True])
def test_influence_on_xla_equals_eager_without_recompiling(problem, compile_counts, compile_hvp):
    model, train, val, space = problem
    # H's smallest eigenvalue on this problem is -6.3: damping 10 makes H + λI positive
    # definite (condition number about 5), so CG is well posed and no step is skipped.
    # tol=0: exactly max_iter iterations, no stopping test (else the short solve warns).
    kw = dict(method="influence", params=space, solver="cg", damping=10.0, max_iter=6,
              tol=0.0, progress=False)  # fmt: skip
    eager = mftx.score(model, train, val, fixed_iterations=True, **kw)
    counts = compile_counts
    first = mftx.score(model, train, val, backend="xla", xla_compile=compile_hvp, **kw)
    # counts[0]: the start state; counts[i]: after iteration i. Warm-up compiles the
    # iteration's graph (openxla's dynamo bridge needs two calls); later iterations reuse it.
    warm = 2 if compile_hvp else 1
    assert len(counts) == 1 + 6
    assert counts[warm + 1 :] == [counts[warm]] * (6 - warm), counts
    before = xla.compile_count()
    counts.clear()
    second = mftx.score(model, train, val, backend="xla", xla_compile=compile_hvp, **kw)
    if not compile_hvp:  # (with openxla, dynamo traces each scoring call's closures afresh)
        assert xla.compile_count() == before, "a second run with the same shapes compiled again"
    assert rel(_flat(first), _flat(eager)) < 1e-4
    assert torch.equal(_flat(first), _flat(second))
    assert first.stats["solver"]["iterations"] == 6
    assert not first.stats["solver"]["negative_curvature"]
    # The caller's model is untouched and still on the CPU.
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.xla
@needs_xla
def test_minres_on_xla_equals_eager_without_recompiling(problem, compile_counts):
    model, train, val, space = problem
    # H's smallest eigenvalue here is -6.3: H + I is indefinite, which CG cannot solve and
    # MINRES can. Fixed iterations with the residual kept on the device, as for CG.
    kw = dict(method="influence", params=space, solver="minres", damping=1.0, max_iter=6,
              tol=0.0, progress=False)  # fmt: skip
    eager = mftx.score(model, train, val, fixed_iterations=True, **kw)
    adaptive = mftx.score(model, train, val, **kw)
    counts = compile_counts
    first = mftx.score(model, train, val, backend="xla", **kw)
    # counts[0]: the start state; counts[i]: after iteration i. The first iteration compiles
    # the iteration's graph; later iterations reuse it.
    assert len(counts) == 1 + 6
    assert counts[2:] == [counts[1]] * 5, counts
    before = xla.compile_count()
    second = mftx.score(model, train, val, backend="xla", **kw)
    assert xla.compile_count() == before, "a second run with the same shapes compiled again"
    # float32 on two devices; an indefinite system amplifies rounding more than CG's test
    # (measured 1.6e-4 with torch_xla 2.9 on the CPU device).
    assert rel(_flat(first), _flat(eager)) < 1e-3
    assert rel(_flat(eager), _flat(adaptive)) < 1e-5
    assert torch.equal(_flat(first), _flat(second))
    st = first.stats["solver"]
    assert st["solver"] == "minres" and st["iterations"] == 6
    assert st["residuals"] == pytest.approx(eager.stats["solver"]["residuals"], rel=1e-3)
    assert first.stats["damping"] == 1.0
