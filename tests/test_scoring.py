"""The scoring engine against float64 brute-force oracles built independently here."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _toys import dense_ggn, mean_loss_fn, mlp_problem, tiny_bert_problem
from torch import nn
from torch.func import functional_call, hessian

import mftx
from mftx.inverse import solvers

MODES = ["rev-rev", "fwd-rev", "double-backward"]


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def mlp():
    model, train, val, obj = mlp_problem()
    space = mftx.select_params(model, exclude=None)
    return model, train, val, obj, space


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_problem()


@pytest.fixture(scope="module")
def mlp_dense(mlp):
    model, train, val, obj, space = mlp
    theta = space.flatten(space.detached())
    return hessian(mean_loss_fn(model, space, train, obj))(theta).detach()


@pytest.fixture(scope="module")
def bert_dense(bert):
    model, train, val, space = bert
    theta = space.flatten(space.detached())
    return hessian(mean_loss_fn(model, space, train, None))(theta).detach()


# ---------------------------------------------------------------- parameter space


def test_select_params_default_exclusions(bert):
    model = bert[0]
    space = mftx.select_params(model)
    assert all("encoder.layer" in n for n in space.names)
    assert not any(
        k in n for n in space.names for k in ("classifier", "pooler", "LayerNorm", "embeddings")
    )
    total = sum(p.numel() for p in model.parameters())
    s = space.summary()
    assert s["total"] == total and s["analysed"] == space.numel
    assert math.isclose(s["share"], space.numel / total)


def test_select_params_counts_tied_tensors_once():
    lin = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": lin, "b": lin})
    space = mftx.select_params(model, exclude=None)
    assert space.numel == 12 and space.summary()["total"] == 12 and len(space) == 2


def test_select_params_nothing_left_is_an_error(bert):
    with pytest.raises(ValueError, match="no analysed parameters"):
        mftx.select_params(bert[0], include=["does-not-exist"])


def test_flatten_unflatten_roundtrip(bert):
    space = bert[3]
    vec = torch.randn(space.numel, dtype=torch.float64)
    assert torch.equal(space.flatten(space.unflatten(vec)), vec)


# ---------------------------------------------------------------- curvature products


@pytest.mark.parametrize("mode", MODES)
def test_hvp_equals_dense_hessian_mlp(mlp, mlp_dense, mode):
    model, train, val, obj, space = mlp
    op = mftx.Curvature(model, space, train, obj, mode=mode)
    v = torch.randn(space.numel, dtype=torch.float64)
    assert rel(op.matvec(v), mlp_dense @ v) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_hvp_equals_dense_hessian_tiny_bert(bert, bert_dense, mode):
    model, train, val, space = bert
    op = mftx.Curvature(model, space, train, mftx.HFClassification(), mode=mode)
    v = torch.randn(space.numel, dtype=torch.float64)
    assert rel(op.matvec(v), bert_dense @ v) < 1e-10


def test_cached_graph_hvp_equals_dense_hessian(bert, bert_dense):
    model, train, val, space = bert
    op = mftx.Curvature(
        model, space, train, mftx.HFClassification(), mode="double-backward", cache_graphs=True
    )
    for _ in range(2):  # the second product reuses the graphs
        v = torch.randn(space.numel, dtype=torch.float64)
        assert rel(op.matvec(v), bert_dense @ v) < 1e-10
    assert len(op._graphs) == len(train)


def test_hvp_on_a_subset_of_batches(mlp):
    model, train, val, obj, space = mlp
    op = mftx.Curvature(model, space, train, obj)
    H1 = hessian(mean_loss_fn(model, space, [train[1]], obj))(space.flatten(space.detached()))
    v = torch.randn(space.numel, dtype=torch.float64)
    assert rel(op.matvec(v, [1]), H1 @ v) < 1e-12


@pytest.mark.parametrize(
    ("mode", "cache"), [(m, False) for m in MODES] + [("double-backward", True)]
)
def test_ggn_equals_dense_jthj(bert, mode, cache):
    model, train, val, space = bert

    def outputs(state, b):
        inputs = {k: v for k, v in b.items() if k != "labels"}
        return functional_call(model, state, (), inputs).logits

    G = dense_ggn(model, space, train, outputs, lambda z, b: F.cross_entropy(z, b["labels"]))
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD, as it must be
    op = mftx.Curvature(
        model, space, train, mftx.HFClassification(), curvature="ggn", mode=mode,
        cache_graphs=cache,
    )  # fmt: skip
    v = torch.randn(space.numel, dtype=torch.float64)
    assert rel(op.matvec(v), G @ v) < 1e-10


def test_ggn_needs_an_objective(mlp):
    model, train, val, obj, space = mlp
    with pytest.raises(TypeError, match="outputs"):
        mftx.Curvature(model, space, train, lambda m, b: obj(m, b), curvature="ggn")


def test_default_objective_is_the_models_own_loss(bert):
    model, train, val, space = bert
    b = train[0]
    assert torch.allclose(mftx.HFClassification()(model, b), model(**b).loss, rtol=1e-14)


def test_compiled_hvp_has_no_graph_breaks(mlp):
    model, train, val, obj, space = mlp
    op = mftx.Curvature(model, space, train, obj)
    params = op.params
    v = tuple(torch.randn_like(p) for p in params)
    explanation = torch._dynamo.explain(op._product)(params, v, train[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_backend_matches_eager(mlp):
    model, train, val, obj, space = mlp
    torch._dynamo.reset()
    kw = dict(method="influence", params=space, loss_fn=obj, damping=0.5, curvature="ggn",
              solver="minres", progress=False)  # fmt: skip
    eager = mftx.score(model, train, val, **kw)
    compiled = mftx.score(model, train, val, backend="compile", **kw)
    for n in eager.names:
        torch.testing.assert_close(compiled.scores[n], eager.scores[n], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- solvers


def _spd_problem(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    A = Q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ Q.T
    b = torch.randn(n, dtype=torch.float64, generator=g)
    return A, b


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_cg_and_explicit_agree_with_linalg_solve(damping):
    A, b = _spd_problem()
    want = torch.linalg.solve(A + damping * torch.eye(len(b), dtype=A.dtype), b)
    res = solvers.cg(lambda v: A @ v, b, damping, tol=1e-12, max_iter=500)
    assert res.converged and rel(res.x, want) < 1e-8
    assert res.residuals[-1] <= 1e-12 and res.n_matvec == res.iterations + 1
    assert res.true_residual <= 1e-11  # recomputed from x: one more product
    ex = solvers.explicit(lambda v: A @ v, b, damping)
    assert rel(ex.x, want) < 1e-8


def test_cg_on_the_model_agrees_with_linalg_solve(mlp, mlp_dense):
    model, train, val, obj, space = mlp
    op = mftx.Curvature(model, space, train, obj, curvature="ggn")
    G = solvers.dense_matrix(op.matvec, space.numel, space.params[0].detach())
    b = torch.randn(space.numel, dtype=torch.float64)
    want = torch.linalg.solve(G + 0.01 * torch.eye(space.numel, dtype=G.dtype), b)
    res = solvers.cg(op.matvec, b, 0.01, tol=1e-13, max_iter=1000)
    assert rel(res.x, want) < 1e-8


def test_cg_fixed_iterations_matches_the_adaptive_loop():
    A, b = _spd_problem()
    adaptive = solvers.cg(lambda v: A @ v, b, 0.0, tol=0.0, max_iter=12)
    fixed = solvers.cg(lambda v: A @ v, b, 0.0, max_iter=12, fixed_iterations=True)
    assert fixed.iterations == 12 and not fixed.negative_curvature
    assert rel(fixed.x, adaptive.x) < 1e-10
    assert fixed.residuals == pytest.approx(adaptive.residuals, rel=1e-8)


def test_cg_fixed_iterations_past_convergence_stays_finite():
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    res = solvers.cg(lambda v: A @ v, b, max_iter=10, fixed_iterations=True)
    assert torch.isfinite(res.x).all()
    assert rel(res.x, torch.tensor([1.0, 0.5], dtype=torch.float64)) < 1e-12
    assert not res.negative_curvature and res.first_negative is None  # p = 0 is not curvature
    # 2I: the first step is exact (residual 0.0); the adaptive loop with tol = 0 stops there.
    exact = solvers.cg(lambda v: 2 * v, b, tol=0.0, max_iter=10)
    assert exact.converged and exact.iterations == 1 and not exact.negative_curvature
    assert torch.equal(exact.x, b / 2)


def test_cg_negative_curvature_raises_or_stops():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(mftx.NegativeCurvatureError, match="not positive definite"):
        solvers.cg(lambda v: A @ v, b, 0.0)
    res = solvers.cg(lambda v: A @ v, b, 0.0, on_negative_curvature="stop")
    assert res.negative_curvature and not res.converged and torch.isfinite(res.x).all()
    assert res.iterations == 1 and res.first_negative[0] == 1 and res.first_negative[1] <= 0
    # The fixed-iteration loop (no host reads inside) honours the same choice afterwards
    # and keeps the same iterate: the one before the first non-positive step.
    with pytest.raises(mftx.NegativeCurvatureError, match="at iteration 1 "):
        solvers.cg(lambda v: A @ v, b, 0.0, max_iter=5, fixed_iterations=True)
    fixed = solvers.cg(
        lambda v: A @ v, b, 0.0, max_iter=5, fixed_iterations=True, on_negative_curvature="stop"
    )
    assert fixed.negative_curvature and not fixed.converged
    assert fixed.first_negative[0] == 1
    assert fixed.first_negative[1] == pytest.approx(res.first_negative[1], rel=1e-12)
    assert rel(fixed.x, res.x) < 1e-14
    # On the first step there is no iterate to keep: both loops raise even with "stop".
    for fixed_iterations in (False, True):
        with pytest.raises(mftx.NegativeCurvatureError, match="no iterate to keep"):
            solvers.cg(lambda v: -(A @ v).abs(), b, 0.0, max_iter=3,
                       fixed_iterations=fixed_iterations, on_negative_curvature="stop")  # fmt: skip
    # Damping that makes the matrix positive definite fixes it.
    assert solvers.cg(lambda v: A @ v, b, 2.5, tol=1e-12).converged


def test_lissa_meets_its_stated_tolerance():
    A, b = _spd_problem(n=20)
    damping, scale = 0.5, 12.0  # eigenvalues of A + λI lie in [0.51, 10.5] < scale
    mu = 0.01 + damping
    depth = 400
    bound = (1 - mu / scale) ** depth  # stated relative error bound
    want = torch.linalg.solve(A + damping * torch.eye(20, dtype=A.dtype), b)
    res = solvers.lissa(lambda v, idx=None: A @ v, b, damping, scale=scale, depth=depth)
    assert rel(res.x, want) <= bound
    assert bound < 1e-3  # the test asks for a meaningful accuracy


def test_lissa_stochastic_averages_batches(mlp):
    model, train, val, obj, space = mlp
    op = mftx.Curvature(model, space, train, obj, curvature="ggn")
    b = torch.randn(space.numel, dtype=torch.float64)
    res = solvers.lissa(op.matvec, b, 1.0, scale=20.0, depth=50, repeats=2, n_batches=len(train))
    assert res.n_matvec == 100 and torch.isfinite(res.x).all()


def test_lissa_divergence_is_detected():
    A, b = _spd_problem(n=10)
    with pytest.raises(mftx.SolverDivergedError, match="scale"):
        solvers.lissa(lambda v: A @ v, b, 0.0, scale=1.0, depth=500)


def test_explicit_refuses_large_problems():
    with pytest.raises(ValueError, match="limited to 100 parameters"):
        solvers.explicit(lambda v: v, torch.ones(101), 0.0, max_size=100)


# ---------------------------------------------------------------- methods


@pytest.mark.parametrize("solver", ["cg", "explicit"])
def test_influence_equals_independent_solve(bert, bert_dense, solver):
    model, train, val, space = bert
    damping = 2.0 * max(0.0, -float(torch.linalg.eigvalsh(bert_dense).min())) + 0.05
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(mean_loss_fn(model, space, val, None))(theta).detach()
    n = space.numel
    s = torch.linalg.solve(bert_dense + damping * torch.eye(n, dtype=theta.dtype), g_val)
    want = -theta * s
    got = mftx.score(
        model, train, val, method="influence", params=space, solver=solver, damping=damping,
        tol=1e-12, max_iter=2000, progress=False,
    )  # fmt: skip
    assert rel(space.flatten([got.scores[n] for n in space.names]), want) < 1e-8
    assert got.stats["solver"]["solver"] == solver
    # Flagged = beneficial = I < 0, most negative first.
    flagged = got.flagged()
    assert len(flagged) == int((want < 0).sum())
    assert (flagged.value < 0).all() and (flagged.value[:-1] <= flagged.value[1:]).all()


def test_influence_with_lissa_is_close(mlp):
    model, train, val, obj, space = mlp
    kw = dict(method="influence", params=space, loss_fn=obj, curvature="ggn", damping=0.5,
              progress=False)  # fmt: skip
    ref = mftx.score(model, train, val, solver="explicit", **kw)
    got = mftx.score(model, train, val, solver="lissa", lissa_scale=5.0, lissa_depth=600,
                     tol=1e-12, **kw)  # fmt: skip
    a = torch.cat([got.scores[n].reshape(-1) for n in got.names])
    b = torch.cat([ref.scores[n].reshape(-1) for n in ref.names])
    assert rel(a, b) < 1e-6


def test_gradient_rule_matches_direct_evaluation(bert):
    model, train, val, space = bert
    lr = 0.05
    theta = space.flatten(space.detached())
    g = torch.func.grad(mean_loss_fn(model, space, train, None))(theta).detach()
    want = theta.abs() - (theta - lr * g).abs()
    got = mftx.score(model, train, None, method="gradient", params=space, lr=lr, progress=False)
    flat = space.flatten([got.scores[n] for n in space.names])
    assert rel(flat, want) < 1e-12
    flagged = got.flagged()
    assert len(flagged) == int((want > 0).sum()) == got.stats["flagged"]
    # The flagged set is exactly "moving toward zero".
    moving = set(((theta - lr * g).abs() < theta.abs()).nonzero().squeeze(1).tolist())
    ends = torch.tensor(space.numels).cumsum(0) - torch.tensor(space.numels)
    got_set = {int(ends[t]) + f for t, f, _ in flagged}
    assert got_set == moving


def _zeroing_deltas(model, space, val, indices):
    f = mean_loss_fn(model, space, val, None)
    theta = space.flatten(space.detached())
    with torch.no_grad():
        base = f(theta)
        out = []
        for i in indices:
            t = theta.clone()
            t[i] = 0
            out.append(float(f(t) - base))
    return torch.tensor(out, dtype=torch.float64)


def test_taylor_and_obd_match_finite_differences(bert):
    model, train, val, space = bert
    theta = space.flatten(space.detached())
    f = mean_loss_fn(model, space, val, None)
    H = hessian(f)(theta).detach()
    idx = torch.argsort(theta.abs(), descending=True)[:40].tolist()  # the ones that matter most
    actual = _zeroing_deltas(model, space, val, idx)
    taylor = mftx.score(model, None, val, method="taylor", params=space, progress=False)
    obd = mftx.score(model, None, val, method="obd", params=space, probes=0, progress=False)
    t = space.flatten([taylor.scores[n] for n in space.names])[idx]
    o = space.flatten([obd.scores[n] for n in space.names])[idx]
    th = theta[idx]
    # Taylor's error is the second-order term ½ H_ii θ_i², up to third order.
    second = 0.5 * H.diagonal()[idx] * th**2
    third_scale = th.abs() ** 3
    c3 = float(((actual - t - second).abs() / third_scale).max())
    assert c3 < 10.0  # the remainder really is third order
    # OBD carries that second-order term: its error is the third-order remainder.
    torch.testing.assert_close(o, t + second, rtol=1e-10, atol=1e-14)
    assert float((actual - o).abs().median()) < 0.5 * float((actual - t).abs().median())


def test_hutchinson_diagonal_is_unbiased(mlp, mlp_dense):
    model, train, val, obj, space = mlp
    from mftx.scoring import hutchinson_diagonal

    op = mftx.Curvature(model, space, train, obj)
    est = hutchinson_diagonal(op, probes=1000, seed=0)
    assert rel(est, mlp_dense.diagonal()) < 0.15


def test_magnitude_ranks_smallest_first(mlp):
    model, train, val, obj, space = mlp
    s = mftx.score(model, method="magnitude", params=space, progress=False)
    c = s.candidates(5)
    theta = space.flatten(space.detached()).abs()
    assert torch.equal(c.value.double(), theta.sort().values[:5].float().double())
    with pytest.raises(ValueError, match="flags none"):
        s.flagged()


def test_scores_save_load_roundtrip(tmp_path, mlp):
    model, train, val, obj, space = mlp
    s = mftx.score(model, train, val, method="influence", params=space, loss_fn=obj,
                   damping=1.0, progress=False)  # fmt: skip
    path = s.save(tmp_path / "scores.safetensors")
    back = mftx.Scores.load(path)
    assert back.method == "influence" and back.names == s.names
    for n in s.names:
        assert torch.equal(back.scores[n], s.scores[n])
    assert back.config["damping"] == 1.0
    assert back.stats["solver"]["iterations"] == s.stats["solver"]["iterations"]
    assert back.candidates(7).equal(s.candidates(7))
    assert back.flagged().equal(s.flagged())


def test_scores_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no scores file"):
        mftx.Scores.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not mftx scores"):
        mftx.Scores.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_work(mlp):
    model, train, val, obj, space = mlp
    kw = dict(params=space, loss_fn=obj, progress=False)
    with pytest.raises(ValueError, match="train is empty"):
        mftx.score(model, [], val, **kw)
    with pytest.raises(ValueError, match="val is empty"):
        mftx.score(model, train, iter([]), **kw)
    with pytest.raises(ValueError, match="no 'labels'"):
        mftx.score(model, train, [{"x": val[0]["x"]}], **kw)
    with pytest.raises(ValueError, match="damping"):
        mftx.score(model, train, val, damping=-1.0, **kw)
    with pytest.raises(ValueError, match="limited to 10 parameters"):
        mftx.score(model, train, val, solver="explicit", max_explicit=10, **kw)
    with pytest.raises(ValueError, match="method must be one of"):
        mftx.score(model, train, val, method="nope", **kw)
    with pytest.raises(TypeError, match="unknown option"):
        mftx.score(model, train, val, dampnig=1.0, **kw)


def test_frozen_parameters_are_reported(mlp):
    model, train, val, obj, _ = mlp
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    space = mftx.select_params(model, exclude=None)
    with pytest.raises(ValueError, match=r"without grad.*0\.weight"):
        mftx.score(model, train, val, params=space, loss_fn=obj, progress=False)


def test_nan_loss_is_reported(mlp):
    model, train, val, obj, space = mlp
    bad = [dict(train[0], x=train[0]["x"].clone())]
    bad[0]["x"][0, 0] = float("nan")
    with pytest.raises(mftx.NonFiniteError, match="training loss is nan on batch 0"):
        mftx.score(model, bad, val, method="gradient", params=space, loss_fn=obj, progress=False)


def test_nan_in_hvp_is_reported(mlp):
    model, train, val, obj, space = mlp

    def loss(m, b):  # finite loss, but its curvature overflows
        return obj(m, b) + 1e200 * (m[0].weight ** 4).sum() * 1e200

    objective = mftx.Objective(lambda m, b: m(b["x"]), lambda z, b: F.cross_entropy(z, b["labels"]))
    with pytest.raises(mftx.NonFiniteError):
        mftx.Curvature(model, space, train, loss).matvec(
            torch.ones(space.numel, dtype=torch.float64)
        )
    assert objective is not None


def test_negative_curvature_in_scoring(bert, bert_dense):
    model, train, val, space = bert
    assert float(torch.linalg.eigvalsh(bert_dense).min()) < 0  # an indefinite Hessian
    with pytest.raises(mftx.NegativeCurvatureError):
        mftx.score(model, train, val, params=space, solver="cg", damping=0.0, max_iter=500,
                   tol=1e-14, progress=False)  # fmt: skip
    with pytest.warns(mftx.ConvergenceWarning, match="non-positive curvature"):
        s = mftx.score(model, train, val, params=space, solver="cg", damping=0.0, max_iter=500,
                       tol=1e-14, on_negative_curvature="stop", progress=False)  # fmt: skip
    assert s.stats["solver"]["negative_curvature"]


def test_defaults_give_finite_scores_on_an_indefinite_hessian(bert, bert_dense):
    """`mftx.score(model, train, val)` as a user first calls it: EK-FAC, a closed form that
    does not care that H + 0.01 I is indefinite, silent (warnings are errors here)."""
    model, train, val, space = bert
    ev = torch.linalg.eigvalsh(bert_dense)
    assert ev[0] + 0.01 < 0  # indefinite even after the default damping
    s = mftx.score(model, train, val, params=space, progress=False)
    assert torch.isfinite(_flat(s, space)).all() and _flat(s, space).abs().max() > 0
    assert s.stats["solver"]["solver"] == "ekfac" and s.stats["damping"] == 0.01


def test_minres_as_written_on_an_indefinite_hessian_reports_its_residual(bert, bert_dense):
    """The reference formula, one argument away: MINRES on H + 0.01 I, which warns."""
    model, train, val, space = bert
    with pytest.warns(mftx.ConvergenceWarning, match=r"MINRES on \(H \+ 0.01 I\)"):
        s = mftx.score(model, train, val, params=space, solver="minres", progress=False)
    flat = _flat(s, space)
    assert torch.isfinite(flat).all() and flat.abs().max() > 0
    st = s.stats["solver"]
    assert st["solver"] == "minres" and s.stats["damping"] == 0.01
    assert st["iterations"] <= 100 and st["n_matvec"] <= 101
    # H + 0.01 I is nearly singular here (an eigenvalue of H at -0.0099986): 100 iterations
    # leave a residual, reported honestly (recomputed from x) and close to what MINRES on the
    # dense matrix reaches (the iterates themselves differ by rounding on such a system).
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(mean_loss_fn(model, space, val, None))(theta).detach()
    dense = solvers.minres(lambda v: bert_dense @ v, g_val, 0.01)
    assert not st["converged"] and st["true_residual"] < 0.1
    assert st["true_residual"] == pytest.approx(st["residuals"][-1], rel=1e-3)
    assert st["true_residual"] == pytest.approx(dense.true_residual, rel=0.2)
    assert st["residuals"] == sorted(st["residuals"], reverse=True)  # never grows


def test_bert_base_layout_summary():
    """The reference study's parameter space on BERT-base (random init, no hub)."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_labels=2))
    s = mftx.select_params(model).summary()
    assert s["total"] == 109_483_778
    assert s["analysed"] == 85_017_600  # 72 Linear weights (84,934,656) and their biases
    assert s["tensors"] == 144
    assert round(s["share"], 3) == 0.777


# ---------------------------------------------------------------- MINRES, auto damping, low rank


def _flat(scores, space):
    return space.flatten([scores.scores[n] for n in space.names])


def test_minres_influence_solves_the_indefinite_system(bert, bert_dense):
    model, train, val, space = bert
    lam = 0.3
    ev = torch.linalg.eigvalsh(bert_dense)
    assert ev[0] + lam < 0 < ev[-1] + lam  # H + λI indefinite: CG cannot solve it
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(mean_loss_fn(model, space, val, None))(theta).detach()
    s = torch.linalg.solve(bert_dense + lam * torch.eye(space.numel, dtype=theta.dtype), g_val)
    got = mftx.score(model, train, val, params=space, solver="minres", damping=lam, tol=1e-11,
                     max_iter=400, progress=False)  # fmt: skip
    assert rel(_flat(got, space), -theta * s) < 1e-8
    st = got.stats["solver"]
    assert st["solver"] == "minres" and st["converged"] and st["true_residual"] <= 1e-10
    assert got.stats["damping"] == lam and isinstance(got.stats["damping"], float)
    assert got.stats["n_hvp"] == st["n_matvec"] == st["iterations"] + 1


def test_auto_damping_makes_the_system_positive_definite_and_solves_it(bert, bert_dense):
    model, train, val, space = bert
    got = mftx.score(model, train, val, params=space, solver="minres", damping="auto", tol=1e-12, max_iter=500,
                     progress=False)  # fmt: skip
    lam = got.stats["damping"]
    assert isinstance(lam, float)
    ev = torch.linalg.eigvalsh(bert_dense)
    spec = got.stats["spectrum"]
    assert abs(spec["lambda_min"] - float(ev[0])) < 1e-2 and spec["n"] == space.numel
    assert lam == pytest.approx(mftx.Spectrum.from_json(spec).auto_damping())
    assert float(ev[0]) + lam >= 0.09 * abs(float(ev[0]))  # positive definite with its margin
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(mean_loss_fn(model, space, val, None))(theta).detach()
    s = torch.linalg.solve(bert_dense + lam * torch.eye(space.numel, dtype=theta.dtype), g_val)
    assert rel(_flat(got, space), -theta * s) < 1e-8
    assert got.stats["solver"]["converged"] and not got.stats["solver"]["negative_curvature"]
    # The Lanczos products are counted with the solve's.
    assert got.stats["n_hvp"] == spec["n_matvec"] + got.stats["solver"]["n_matvec"]


def test_lanczos_solver_saves_eigenpairs_and_reuses_them(tmp_path, bert, bert_dense):
    model, train, val, space = bert
    path = tmp_path / "eig.safetensors"
    kw = dict(params=space, solver="lanczos", rank=8, lanczos_steps=120, lanczos_tol=1e-9,
              lowrank_file=str(path), progress=False)  # fmt: skip
    first = mftx.score(model, train, val, damping=0.5, **kw)
    assert path.is_file() and not first.stats["lowrank"]["loaded"]
    assert first.stats["n_hvp"] == first.stats["solver"]["n_matvec"] > 0
    e, V = torch.linalg.eigh(bert_dense)
    idx = torch.argsort(e.abs(), descending=True)[:8]
    e, V = e[idx], V[:, idx]
    theta = space.flatten(space.detached())

    def want(val_batches, lam):
        g = torch.func.grad(mean_loss_fn(model, space, val_batches, None))(theta).detach()
        return -theta * (V @ ((V.T @ g) / (e + lam)))

    assert rel(_flat(first, space), want(val, 0.5)) < 1e-7
    # A new validation set and another damping: no curvature product at all.
    new_val = [train[1]]
    again = mftx.score(model, train, new_val, damping=0.2, **kw)
    assert again.stats["lowrank"]["loaded"] and again.stats["n_hvp"] == 0
    assert rel(_flat(again, space), want(new_val, 0.2)) < 1e-7
    with pytest.raises(ValueError, match="computed with"):
        mftx.score(model, train, val, curvature="ggn", **kw)
    with pytest.raises(ValueError, match="holds 8 eigenpairs"):
        mftx.score(model, train, val, **{**kw, "rank": 5})
    other = mftx.select_params(model, include=[r"layer\.1\.output\.dense\.bias"])
    with pytest.raises(ValueError, match="another parameter space"):
        mftx.score(model, train, val, **{**kw, "params": other})


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"damping": "Auto"}, "damping must be a number >= 0 or 'auto'"),
        ({"damping": float("nan")}, "damping must be finite"),
        ({"tol": -1.0}, "tol must be finite and >= 0"),
        ({"tol": float("inf")}, "tol must be finite and >= 0"),
        ({"solver": "lanczos", "rank": 30, "lanczos_steps": 20}, "lanczos_steps must be"),
        ({"solver": "arnoldi"}, "solver must be one of"),
    ],
)
def test_solver_settings_are_validated(mlp, opts, message):
    model, train, val, obj, space = mlp
    with pytest.raises(ValueError, match=message):
        mftx.score(model, train, val, params=space, loss_fn=obj, progress=False, **opts)


@pytest.mark.parametrize("solver", ["minres", "lanczos", "explicit", "lissa", "ekfac"])
def test_solvers_on_the_compile_backend_match_eager(mlp, solver):
    model, train, val, obj, space = mlp
    torch._dynamo.reset()
    kw = dict(method="influence", params=space, loss_fn=obj, damping=0.5,
              curvature="hessian" if solver == "ekfac" else "ggn", solver=solver,
              lissa_scale=5.0, lissa_depth=50, rank=6, progress=False)  # fmt: skip
    with warnings.catch_warnings():
        # LiSSA's 50 steps stop short of its tolerance (and say so): both backends alike
        warnings.filterwarnings("ignore", category=mftx.ConvergenceWarning)
        eager = mftx.score(model, train, val, **kw)
        compiled = mftx.score(model, train, val, backend="compile", **kw)
    assert (eager.converged is False) == (solver == "lissa")
    torch.testing.assert_close(_flat(compiled, space), _flat(eager, space), rtol=1e-9, atol=1e-12)


def test_minres_fixed_iterations_on_the_compile_backend(mlp):
    """The mode the XLA backend uses, with compiled products: equal to the tolerance mode."""
    model, train, val, obj, space = mlp
    torch._dynamo.reset()
    kw = dict(params=space, loss_fn=obj, damping=0.01, solver="minres", tol=0.0, progress=False)
    adaptive = mftx.score(model, train, val, max_iter=15, **kw)
    fixed = mftx.score(model, train, val, backend="compile", fixed_iterations=True, max_iter=15,
                       **kw)  # fmt: skip
    torch.testing.assert_close(_flat(fixed, space), _flat(adaptive, space), rtol=1e-9, atol=1e-12)
    assert fixed.stats["solver"]["residuals"] == pytest.approx(
        adaptive.stats["solver"]["residuals"], rel=1e-8
    )
