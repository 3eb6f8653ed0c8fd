"""Several right-hand sides in one solve, batched curvature products, reorthogonalised MINRES,
auto damping from a recorded spectrum, cheaper Lanczos reorthogonalisation and float32 EK-FAC
eigenbases: each against a dense float64 oracle or the path it replaces."""

from __future__ import annotations

import pytest
import torch
from _toys import tiny_bert_problem

import mftx
from mftx.curvature import lanczos, spectra
from mftx.inverse import ekfac, solvers


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def symmetric(n=60, seed=0, low=-2.0, high=5.0, k=3):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    ev = torch.linspace(low, high, n, dtype=torch.float64)
    B = torch.randn(k, n, dtype=torch.float64, generator=g)
    return Q @ torch.diag(ev) @ Q.T, B


class Counting:
    """A matvec over rows that counts its calls and the rows it was given."""

    def __init__(self, A):
        self.A, self.calls, self.rows = A, 0, []

    def __call__(self, V):
        self.calls += 1
        self.rows.append(V.shape[0] if V.dim() == 2 else 1)
        return V @ self.A.T


@pytest.mark.parametrize("lam", [0.0, 0.37])
def test_minres_several_right_hand_sides_match_the_oracle_and_separate_solves(lam):
    A, B = symmetric()
    mv = Counting(A)
    many = solvers.minres(mv, B, lam, tol=1e-12, max_iter=400)
    assert isinstance(many, list) and len(many) == 3
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    for res, b in zip(many, B):
        want = torch.linalg.solve(A + lam * eye, b)
        one = solvers.minres(lambda v: A @ v, b, lam, tol=1e-12, max_iter=400)
        assert res.converged and rel(res.x, want) < 1e-9 and rel(res.x, one.x) < 1e-9
        assert abs(res.iterations - one.iterations) <= 3  # rounding moves the last steps
        # The same recurrence: equal residuals until rounding (the stacked product rounds
        # differently) shows in late iterations.
        assert res.residuals[:30] == pytest.approx(one.residuals[:30], rel=1e-6)
        assert res.true_residual <= 1e-11
    # One stacked product per iteration for the systems still running, plus the final
    # true-residual product: far fewer calls than three separate solves.
    assert mv.calls <= max(r.iterations for r in many) + 2
    assert mv.rows[0] == 3 and mv.calls < sum(r.n_matvec for r in many) / 2


def test_cg_several_right_hand_sides_stop_separately():
    A, B = symmetric(low=0.05, high=4.0)
    B[1] = 0.0  # a zero right-hand side is solved at once
    B[2] = A[:, 0]  # ... and this one in few iterations? no: just another system
    mv = Counting(A)
    many = solvers.cg(mv, B, 0.1, tol=1e-11, max_iter=300)
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    assert many[1].reason == "b is zero" and many[1].iterations == 0
    assert torch.equal(many[1].x, torch.zeros_like(B[1]))
    for i in (0, 2):
        want = torch.linalg.solve(A + 0.1 * eye, B[i])
        one = solvers.cg(lambda v: A @ v, B[i], 0.1, tol=1e-11, max_iter=300)
        assert many[i].converged and rel(many[i].x, want) < 1e-9
        assert abs(many[i].iterations - one.iterations) <= 2 and rel(many[i].x, one.x) < 1e-9
    assert max(mv.rows[:-1]) == 2  # the zero system takes no part (the last: true residuals)


def test_cg_several_right_hand_sides_negative_curvature_is_per_system():
    A, B = symmetric(low=-1.0, high=3.0)
    with pytest.raises(mftx.NegativeCurvatureError):
        solvers.cg(lambda V: V @ A.T, B, 0.0, tol=1e-10, max_iter=200)
    many = solvers.cg(lambda V: V @ A.T, B, 0.0, tol=1e-10, max_iter=200,
                      on_negative_curvature="stop")  # fmt: skip
    for res, b in zip(many, B):
        one = solvers.cg(lambda v: A @ v, b, 0.0, tol=1e-10, max_iter=200,
                         on_negative_curvature="stop")  # fmt: skip
        assert res.negative_curvature and res.first_negative[0] == one.first_negative[0]
        assert rel(res.x, one.x) < 1e-12


def test_several_right_hand_sides_refuse_fixed_iterations_and_bad_shapes():
    A, B = symmetric()
    with pytest.raises(ValueError, match="fixed_iterations=False"):
        solvers.cg(lambda V: V @ A.T, B, 0.1, fixed_iterations=True)
    with pytest.raises(ValueError, match="right-hand sides"):
        solvers.minres(lambda V: V, B[None], 0.1)


def test_cg_reports_the_true_residual():
    """In float32 the recurrence's residual drifts below the true one; `relative_residual`
    is the one recomputed from x for both CG and MINRES (the same kind of number)."""
    A, B = symmetric(n=200, low=1e-3, high=1.0)
    A32, b32 = A.float(), B[0].float()
    for solve in (solvers.cg, solvers.minres):
        res = solve(lambda v: A32 @ v, b32, 0.0, tol=1e-7, max_iter=400)
        true = float(torch.linalg.vector_norm(b32.double() - A @ res.x.double()) / B[0].norm())
        assert res.relative_residual == res.true_residual
        assert res.true_residual == pytest.approx(true, rel=0.5)  # float32 evaluation of it
        if res.converged:
            assert res.true_residual <= max(1e-7, 10 * res.residuals[-1], 1.2e-4)


def test_reorthogonalised_minres_matches_the_oracle_where_plain_minres_stalls():
    """A clustered indefinite spectrum: plain MINRES loses orthogonality and stalls; with the
    basis kept it reaches the solution of the dense system."""
    n = 300
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    ev = torch.cat([torch.linspace(-1.0, -1e-3, 20, dtype=torch.float64),
                    torch.logspace(-4, 2, n - 20, dtype=torch.float64)])  # fmt: skip
    A = Q @ torch.diag(ev) @ Q.T
    b = torch.randn(n, dtype=torch.float64, generator=g)
    want = torch.linalg.solve(A, b)
    iters = 160
    plain = solvers.minres(lambda v: A @ v, b, 0.0, tol=0.0, max_iter=iters)
    ortho = solvers.minres(lambda v: A @ v, b, 0.0, tol=0.0, max_iter=iters, reorthogonalize=True)
    assert "reorthogonalised against" in ortho.reason
    assert ortho.true_residual < 0.75 * plain.true_residual
    # With the basis kept, the recurrence's residual is the true one (orthogonality holds).
    assert ortho.residuals[-1] == pytest.approx(ortho.true_residual, rel=1e-3)
    done = solvers.minres(lambda v: A @ v, b, 0.0, tol=1e-10, max_iter=n, reorthogonalize=True)
    assert done.converged and rel(done.x, want) < 1e-6
    # Several right-hand sides keep a basis each.
    two = solvers.minres(lambda V: V @ A.T, torch.stack([b, b]), 0.0, tol=0.0, max_iter=iters,
                         reorthogonalize=True)  # fmt: skip
    assert rel(two[1].x, ortho.x) < 1e-10


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_problem()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize(
    ("mode", "cache"),
    [("rev-rev", False), ("double-backward", False), ("double-backward", True), ("fwd-rev", False)],
)
def test_batched_products_equal_one_product_per_row(bert, curvature, mode, cache):
    model, train, _, space = bert
    op = mftx.Curvature(model, space, train, mftx.HFClassification(), curvature=curvature,
                        mode=mode, cache_graphs=cache)  # fmt: skip
    V = torch.randn(3, space.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    many = op.matvec(V)
    assert op.n_matvec == 1
    one = torch.stack([op.matvec(v) for v in V])
    assert rel(many, one) < 1e-12
    with pytest.raises(ValueError, match=r"expected \(k, "):
        op.matvec(V[:, :-1])
    ref = mftx.Curvature(model, space, train, mftx.HFClassification(), curvature=curvature)
    assert rel(many, torch.stack([ref.matvec(v) for v in V])) < 1e-12  # every mode, one answer


def test_score_with_several_validation_sets_equals_separate_scores(bert):
    model, train, val, space = bert
    sets = {"all": val, "first": [{k: v[:3] for k, v in val[0].items()}], "train": train}
    for solver, lam in (("minres", 0.3), ("cg", 3.0)):
        kw = dict(params=space, solver=solver, damping=lam, tol=1e-10, max_iter=300,
                  progress=False)  # fmt: skip
        many = mftx.score(model, train, sets, **kw)
        assert list(many) == list(sets)
        separate = 0
        for name, v in sets.items():
            one = mftx.score(model, train, v, **kw)
            separate += one.stats["n_hvp"]
            a = torch.cat([many[name].scores[n].reshape(-1) for n in space.names])
            b = torch.cat([one.scores[n].reshape(-1) for n in space.names])
            assert rel(a, b) < 1e-8, (solver, name)
            assert many[name].stats["val_loss"] == pytest.approx(one.stats["val_loss"])
            assert many[name].stats["shared_solve"] == list(sets)
        assert many["all"].stats["n_hvp"] < separate / 2
    # Other methods score the sets one after another.
    tay = mftx.score(model, train, sets, method="taylor", params=space, progress=False)
    assert set(tay) == set(sets) and tay["all"].method == "taylor"


def test_ekfac_several_validation_sets_fit_once_equal_separate_scores(bert, monkeypatch):
    model, train, val, space = bert
    sets = {"all": val, "first": [{k: v[:3] for k, v in val[0].items()}], "train": train}
    fits = []
    real = ekfac.fit
    monkeypatch.setattr(ekfac, "fit", lambda *a, **k: fits.append(1) or real(*a, **k))
    kw = dict(params=space, solver="ekfac", damping=0.05, progress=False)
    many = mftx.score(model, train, sets, **kw)
    assert len(fits) == 1 and list(many) == list(sets)
    for name, v in sets.items():
        one = mftx.score(model, train, v, **kw)
        a = torch.cat([many[name].scores[n].reshape(-1) for n in space.names])
        b = torch.cat([one.scores[n].reshape(-1) for n in space.names])
        assert rel(a, b) < 1e-12, name
        assert many[name].stats["shared_solve"] == list(sets)
        assert many[name].stats["damping"] == one.stats["damping"] == 0.05
        assert many[name].stats["n_hvp"] == 0 and many[name].converged is None
    assert len(fits) == 1 + len(sets)
    assert rel(torch.cat([many["all"].scores[n].reshape(-1) for n in space.names]),
               torch.cat([many["first"].scores[n].reshape(-1) for n in space.names])) > 1e-3  # fmt: skip


def test_auto_damping_from_a_recorded_spectrum_costs_no_product(bert, tmp_path):
    model, train, val, space = bert
    spec = mftx.spectrum(model, train, params=space, probes=1, steps=60, progress=False)
    path = spec.save(tmp_path / "spec.json")
    own = mftx.score(model, train, val, params=space, solver="minres", damping="auto",
                     progress=False)  # fmt: skip
    for recorded in (spec, str(path)):
        got = mftx.score(model, train, val, params=space, solver="minres", damping="auto",
                         spectrum=recorded, progress=False)  # fmt: skip
        assert got.stats["damping"] == pytest.approx(own.stats["damping"], rel=1e-9)
        assert got.stats["n_hvp"] == got.stats["solver"]["n_matvec"]  # nothing spent on λ
        assert own.stats["n_hvp"] > own.stats["solver"]["n_matvec"]
        assert got.stats["spectrum_recorded"]
    with pytest.raises(ValueError, match="of the hessian, the system of the ggn"):
        mftx.score(model, train, val, params=space, solver="minres", damping="auto",
                   spectrum=spec, curvature="ggn", progress=False)  # fmt: skip
    other = mftx.select_params(model, include=[r"layer\.1\.output\.dense\.bias"])
    with pytest.raises(ValueError, match="parameters"):
        mftx.score(model, train, val, params=other, solver="minres", damping="auto",
                   spectrum=spec, progress=False)  # fmt: skip


def test_lanczos_without_reorthogonalisation_keeps_no_basis_and_one_pass_suffices():
    A, B = symmetric(n=80)
    full = lanczos.lanczos(lambda v: A @ v, B[0], 30)
    plain = lanczos.lanczos(lambda v: A @ v, B[0], 30, reorthogonalize=False)
    assert plain.chunks == [] and len(full.chunks) > 0
    # Early on, before orthogonality is lost, the two recurrences agree.
    assert torch.allclose(plain.alpha[:8], full.alpha[:8], rtol=1e-9, atol=1e-12)
    Q = full.basis_rows()
    assert float((Q @ Q.T - torch.eye(len(Q), dtype=Q.dtype)).abs().max()) < 1e-12
    theta = torch.linalg.eigvalsh(A)
    run = lanczos.lanczos(lambda v: A @ v, B[0], 80)
    got, _, _ = run.ritz()
    assert torch.allclose(got, theta, atol=1e-9)  # n steps: the whole spectrum, no copies


def test_spectrum_probes_keep_no_basis_and_estimate_the_trace():
    A, _ = symmetric(n=50, low=0.0, high=2.0)
    spec = spectra.estimate(lambda v: A @ v, torch.zeros(50, dtype=torch.float64), steps=20,
                            probes=40, probe_steps=4, seed=1)  # fmt: skip
    assert spec.trace == pytest.approx(float(A.trace()), abs=5 * spec.trace_std)


def test_ekfac_eigenbases_are_float64_unless_asked(monkeypatch):
    """By default every factor is decomposed in float64; eigh_dtype=float32 decomposes the
    large ones in float32 and, at a damping that is not tiny, stays close to it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 260), torch.nn.Tanh(), torch.nn.Linear(260, 3))
    obj = mftx.Objective(lambda m, b: m(b["x"]),
                         lambda z, b: torch.nn.functional.cross_entropy(z, b["labels"]),
                         requires=("labels",))  # fmt: skip
    batches = [
        {"x": torch.randn(200, 300), "labels": torch.randint(0, 3, (200,))} for _ in range(3)
    ]
    space = mftx.select_params(model, structural=False)
    g = torch.randn(space.numel, generator=torch.Generator().manual_seed(3))
    calls = []
    real = torch.linalg.eigh

    def eigh(M):
        calls.append((M.shape[0], M.dtype))
        return real(M)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    slow = ekfac.fit(model, space, batches, obj, fisher="empirical")
    assert calls and all(d == torch.float64 for _, d in calls)
    calls.clear()
    fast = ekfac.fit(model, space, batches, obj, fisher="empirical", eigh_dtype=torch.float32)
    assert (301, torch.float32) in calls and (3, torch.float64) in calls  # large ones in float32
    monkeypatch.undo()
    lam = 0.01 * float(slow.eigenvalues().max())
    assert rel(fast.solve(g, lam), slow.solve(g, lam)) < 1e-3


def test_analyze_hands_the_spectrum_stage_to_auto_damping_only_when_it_is_the_same_run():
    from dataclasses import replace

    from mftx.study.analysis import _with_spectrum

    spec = spectra.Spectrum(
        n=10, lambda_min=-1.0, lambda_max=4.0, lambda_min_error=1e-4, lambda_max_error=1e-4,
        ritz_values=[-1.0, 0.5, 4.0], ritz_errors=[1e-4, 1.0, 1e-4], trace=3.0, trace_std=None,
        trace_method="x", nodes=[], weights=[], n_matvec=3, seconds=0.1,
        info={"seed": 0, "tol": 1e-3, "curvature": "hessian"},
    )  # fmt: skip
    cfg = mftx.ScoreConfig(method="influence", solver="minres", damping="auto")
    assert _with_spectrum(cfg, {"hessian": spec}).spectrum is spec
    assert _with_spectrum(cfg, {"ggn": spec}).spectrum is None  # another curvature
    assert _with_spectrum(replace(cfg, damping=0.1), {"hessian": spec}).spectrum is None
    assert _with_spectrum(replace(cfg, seed=1), {"hessian": spec}).spectrum is None
    assert _with_spectrum(replace(cfg, lanczos_steps=2), {"hessian": spec}).spectrum is None
    loose = replace(spec, lambda_min_error=0.5)  # not converged to the solve's tolerance
    assert _with_spectrum(cfg, {"hessian": loose}).spectrum is None
