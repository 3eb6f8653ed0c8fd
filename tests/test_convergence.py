"""Runs that report their own quality: the default solver, ConvergenceWarning, strict=True,
what `Scores` says it computed, and `mftx.diagnose` on a tiny indefinite problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from _toys import mean_loss_fn, tiny_bert_problem
from torch.func import hessian

import mftx


@pytest.fixture(scope="module")
def problem():
    return tiny_bert_problem()


@pytest.fixture(scope="module")
def dense_hessian(problem):
    model, train, _, space = problem
    f = mean_loss_fn(model, space, train, None)
    return hessian(f)(space.flatten(space.detached())).detach()


def test_the_default_is_ekfac_and_says_nothing(problem):
    model, train, val, space = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = mftx.score(model, train, val, params=space, progress=False)
    assert mftx.DEFAULT_SOLVER == "ekfac" == s.config["solver"] == s.stats["solver"]["solver"]
    assert s.converged is None  # a closed form: nothing to converge
    assert "EK-FAC of the sampled Fisher" in s.summary() and "closed form" in s.summary()
    assert "EK-FAC" in repr(s) and f"{space.numel:,} parameters" in repr(s)
    explicit = mftx.score(model, train, val, params=space, solver="ekfac", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(s.tensors(), explicit.tensors()))


def test_minres_as_written_warns_naming_solver_iterations_and_residual(problem):
    model, train, val, space = problem
    with pytest.warns(mftx.ConvergenceWarning) as caught:
        s = mftx.score(model, train, val, params=space, solver="minres", max_iter=3, progress=False)
    (w,) = caught
    msg = str(w.message)
    res = s.stats["solver"]["relative_residual"]
    assert res > 1e-6 and s.converged is False
    for part in ("MINRES on (H + 0.01 I)", "3 it.", f"rel. residual {res:.3g}", "NOT converged",
                 "solver='ekfac'", "damping='auto'", "strict=True", "mftx.diagnose"):  # fmt: skip
        assert part in msg, part
    assert issubclass(mftx.ConvergenceWarning, UserWarning)
    assert issubclass(mftx.ConvergenceWarning, mftx.MftxWarning)
    assert w.filename == __file__  # points at the caller
    assert "NOT converged" in s.summary() and "products" in s.summary()
    assert "NOT converged" in repr(s)


def test_the_warning_is_filterable_by_the_mftx_class(problem):
    model, train, val, space = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=mftx.MftxWarning)
        s = mftx.score(model, train, val, params=space, solver="minres", max_iter=2, progress=False)
    assert s.converged is False


def test_strict_raises_instead_of_returning_a_partial_iterate(problem):
    model, train, val, space = problem
    with pytest.raises(mftx.ConvergenceError, match=r"MINRES.*2 it\..*NOT converged"):
        mftx.score(model, train, val, params=space, solver="minres", max_iter=2, strict=True,
                   progress=False)  # fmt: skip


def test_cg_stopped_at_negative_curvature_warns(problem):
    model, train, val, space = problem
    with pytest.warns(mftx.ConvergenceWarning, match=r"CG on \(H \+ 0.01 I\).*NOT converged"):
        s = mftx.score(model, train, val, params=space, solver="cg", on_negative_curvature="stop",
                       progress=False)  # fmt: skip
    assert s.stats["solver"]["negative_curvature"]


def test_a_converged_solve_is_silent_and_says_so(problem, dense_hessian):
    model, train, val, space = problem
    lam = float(-torch.linalg.eigvalsh(dense_hessian)[0]) + 1.0  # H + λI positive definite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = mftx.score(model, train, val, params=space, solver="cg", damping=lam, tol=1e-8,
                       max_iter=500, strict=True, progress=False)  # fmt: skip
    assert s.converged is True and "(converged)" in s.summary()
    for method in ("gradient", "taylor", "magnitude"):
        other = mftx.score(model, train, val, params=space, method=method, progress=False)
        assert other.converged is None and method in other.summary()


def test_diagnose_finds_the_indefinite_system_and_a_damping_that_fixes_it(problem, dense_hessian):
    model, train, _, space = problem
    eig = torch.linalg.eigvalsh(dense_hessian)
    assert eig[0] < -0.01  # the oracle: H + 0.01 I is indefinite here
    d = mftx.diagnose(model, train, params=space, damping=0.01, steps=40, progress=False)
    assert d.indefinite and not d.definite and d.verdict == "indefinite"
    # Ritz values lie inside the spectrum
    assert eig[0] - 1e-8 <= d.spectrum.lambda_min <= 0 and d.spectrum.lambda_max <= eig[-1] + 1e-8
    rec = d.recommended_damping
    assert float(eig[0]) + rec > 0  # the recommended damping makes the dense system PD
    text = d.report()
    for part in ("indefinite", "CG", "MINRES", "EK-FAC", "damping=", "curvature='ggn'"):
        assert part in text, part
    assert d.to_json()["verdict"] == "indefinite"
    # at the recommended damping the system is definite and CG converges silently
    d2 = mftx.diagnose(model, train, params=space, damping=rec, steps=40, progress=False)
    assert d2.definite and not d2.indefinite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mftx.score(model, train, train, params=space, solver="cg", damping=rec, max_iter=500,
                   progress=False)  # fmt: skip


def test_diagnose_calls_the_ggn_definite_and_refuses_bad_damping(problem):
    model, train, _, space = problem
    d = mftx.diagnose(model, train, params=space, curvature="ggn", damping=0.01, steps=30,
                      progress=False)  # fmt: skip
    assert not d.indefinite and d.spectrum.lambda_min > -1e-8
    assert "G + 0.01 I" in d.report()
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        mftx.diagnose(model, train, params=space, damping=-1.0, progress=False)
