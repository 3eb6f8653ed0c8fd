"""`mftx.spectrum`: extremes, trace, quadrature and the auto-damping rule, against dense oracles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _toys import mean_loss_fn, tiny_bert_problem
from test_solvers import indefinite
from torch.func import hessian

import mftx
from mftx.curvature import spectra
from mftx.curvature.lanczos import rademacher


@pytest.fixture(scope="module")
def bert_H():
    model, train, val, space = tiny_bert_problem()
    theta = space.flatten(space.detached())
    H = hessian(mean_loss_fn(model, space, train, None))(theta).detach()
    return model, train, space, H


def test_spectrum_extremes_of_the_tiny_bert_hessian(bert_H):
    model, train, space, H = bert_H
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < 0 < ev[-1]  # indefinite
    spec = mftx.spectrum(model, train, params=space, steps=80, tol=1e-4, probes=2,
                         probe_steps=5, progress=False)  # fmt: skip
    assert abs(spec.lambda_min - float(ev[0])) < 1e-3
    assert abs(spec.lambda_max - float(ev[-1])) < 1e-3
    # The error bounds hold: an eigenvalue lies within them.
    for theta, err in (
        (spec.lambda_min, spec.lambda_min_error),
        (spec.lambda_max, spec.lambda_max_error),
    ):
        assert float((ev - theta).abs().min()) <= err + 1e-12
    # Ritz values interlace: they lie inside [λ_min, λ_max].
    assert min(spec.ritz_values) >= float(ev[0]) - 1e-10
    assert max(spec.ritz_values) <= float(ev[-1]) + 1e-10
    assert spec.n == space.numel and len(spec.nodes) == 2 and len(spec.nodes[1]) == 5
    assert spec.n_matvec == len(spec.ritz_values) + 5 < 80
    assert spec.info["curvature"] == "hessian" and spec.info["hvp_batches"] == len(train)


def test_spectrum_of_the_ggn_is_nonnegative(bert_H):
    model, train, space, _ = bert_H
    spec = mftx.spectrum(model, train, params=space, curvature="ggn", steps=60, probes=1,
                         progress=False)  # fmt: skip
    assert spec.lambda_min > -1e-10 and spec.lambda_max > 0


def test_quadrature_reproduces_the_moments_of_the_start_vector():
    """Gauss quadrature with m nodes is exact for polynomials of degree <= 2m − 1."""
    A, _, _ = indefinite(n=50, low=-1.0, high=1.0)
    m = 6
    spec = spectra.estimate(lambda v: A @ v, torch.zeros(50, dtype=torch.float64), steps=m,
                            tol=0.0, probes=1, seed=3)  # fmt: skip
    q = rademacher(50, 3, A[0]) / math.sqrt(50)
    nodes = torch.tensor(spec.nodes[0], dtype=torch.float64)
    weights = torch.tensor(spec.weights[0], dtype=torch.float64)
    Ap = torch.eye(50, dtype=torch.float64)
    for p in range(2 * m):
        assert float((weights * nodes**p).sum()) == pytest.approx(float(q @ Ap @ q), abs=1e-12)
        Ap = Ap @ A
    # Degree 2m is not integrated exactly (the test above could fail).
    assert float((weights * nodes ** (2 * m)).sum()) != pytest.approx(float(q @ Ap @ q), abs=1e-6)


def test_density_integrates_to_one_and_peaks_at_eigenvalue_clusters():
    ev = torch.cat([torch.full((30,), -1.0), torch.full((70,), 2.0)]).double()
    Q = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64))[0]
    A = Q @ torch.diag(ev) @ Q.T
    spec = spectra.estimate(lambda v: A @ v, ev, steps=10, probes=20, probe_steps=5, seed=0)
    grid, dens = spec.density(sigma=0.05, points=4000)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    near = lambda c: float(torch.trapezoid(dens * ((grid - c).abs() < 0.5), grid))  # noqa: E731
    assert near(-1.0) == pytest.approx(0.3, abs=0.08) and near(2.0) == pytest.approx(0.7, abs=0.08)


def test_trace_estimates():
    A, _, ev = indefinite(n=80, low=-1.0, high=3.0)
    n = 80
    spec = spectra.estimate(lambda v: A @ v, ev, steps=5, probes=4, probe_steps=3, seed=11)
    # Hutchinson from the probes' Rademacher starts: the mean of zᵀAz, no extra products.
    samples = [float(rademacher(n, 11 + p, ev) @ A @ rademacher(n, 11 + p, ev)) for p in range(4)]
    assert spec.trace == pytest.approx(sum(samples) / 4, rel=1e-12)
    assert spec.n_matvec == 5 + 3 * 3 and spec.trace_std > 0
    # Hutch++ is exact on matrices of rank <= products/3 ...
    U = torch.linalg.qr(torch.randn(n, 4, dtype=torch.float64))[0]
    L = U @ torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.5], dtype=torch.float64)) @ U.T
    assert spectra.hutchpp(lambda v: L @ v, ev, 12, seed=0) == pytest.approx(4.5, rel=1e-10)
    # ... and unbiased in general: the mean of many seeds approaches the trace.
    est = [spectra.hutchpp(lambda v: A @ v, ev, 6, seed=s) for s in range(200)]
    mean = sum(est) / len(est)
    std = (sum((e - mean) ** 2 for e in est) / (len(est) - 1) / len(est)) ** 0.5
    assert abs(mean - float(A.trace())) < 4 * std
    with pytest.raises(ValueError, match="multiple of 3"):
        spectra.hutchpp(lambda v: A @ v, ev, 7, seed=0)


def test_auto_damping_rule():
    # Indefinite: shift the most negative eigenvalue to 10 % of its size above zero.
    assert spectra.auto_damping(-2.0, 4.0) == pytest.approx(2.0 + 0.2)
    # The Lanczos error bound makes it more careful.
    assert spectra.auto_damping(-2.0, 4.0, lambda_min_error=0.5) == pytest.approx(2.5 * 1.1)
    # Little negative curvature: the floor relative to the spectral radius wins.
    assert spectra.auto_damping(-0.01, 4.0) == pytest.approx(0.01 + 0.04)
    # Positive semi-definite: the floor only.
    assert spectra.auto_damping(0.0, 4.0) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="zero"):
        spectra.auto_damping(0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        spectra.auto_damping(float("nan"), 1.0)


def test_spectrum_json_roundtrip_and_plot(tmp_path, bert_H):
    A, _, ev = indefinite(n=30)
    spec = spectra.estimate(lambda v: A @ v, ev, steps=12, probes=2, probe_steps=4)
    back = mftx.Spectrum.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec
    path = spec.save(tmp_path / "s.json")
    assert mftx.Spectrum.load(path) == spec
    with pytest.raises(ValueError, match="not an mftx spectrum"):
        mftx.Spectrum.from_json({"format": "other"})
    png = spectra.plot_density({"a": spec, "b": back}, tmp_path / "d.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_spectrum_bad_input(bert_H):
    model, train, space, _ = bert_H
    with pytest.raises(ValueError, match="train is empty"):
        mftx.spectrum(model, [], params=space, progress=False)
    with pytest.raises(ValueError, match="backend"):
        mftx.spectrum(model, train, params=space, backend="xla", progress=False)
    with pytest.raises(ValueError, match="trace"):
        mftx.spectrum(model, train, params=space, trace="exact", progress=False)


@pytest.mark.parametrize("limit_rows", [1, 3])
def test_lanczos_basis_blocks_shrink_for_long_vectors(monkeypatch, limit_rows):
    """Long vectors get fewer basis rows per block (1 GiB each); the run is the same."""
    from mftx.curvature import lanczos as engine

    A = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    start = rademacher(40, 1, A[0])
    want = engine.lanczos(lambda v: A @ v, start, 25)
    assert engine._chunk_rows(40, torch.float64) == 16
    assert engine._chunk_rows(302_000_000, torch.float32) == 1  # BERT-large's analysed space
    monkeypatch.setattr(engine, "_CHUNK_BYTES", limit_rows * 40 * 8)
    got = engine.lanczos(lambda v: A @ v, start, 25)
    assert {len(c) for c in got.chunks} == {limit_rows}
    assert torch.allclose(got.alpha, want.alpha, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.ritz()[0], want.ritz()[0], rtol=1e-10, atol=1e-10)
