"""`mftx demo` end to end on a tiny model, and the summary it ends with."""

from __future__ import annotations

import re

import pytest
from test_cli import workspace  # noqa: F401  (fixture)

from mftx.cli import _describe_method, main
from mftx.study.report.headline import verdict


def _demo(workspace, out, *extra):  # noqa: F811
    root, data, model = workspace
    return main([
        "demo", "--model", str(model), "--data", str(data), "--out", str(out),
        "--train-size", "32", "--batch-size", "8", "--lr", "1e-3", "--target", "0.3",
        "--epochs", "2", "--eval-every", "2", "--ks", "5,50", "--hvp-batches", "2",
        "--random-draws", "2", "--fresh-rows", "8", "--no-progress", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def demo_output(workspace, tmp_path_factory):  # noqa: F811
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _demo(workspace, out)
    return rc, buf.getvalue(), out


def test_demo_prints_every_protocol_and_a_summary_from_the_run(demo_output):
    rc, text, out = demo_output
    assert rc == 0, text
    # The header says what runs, from the settings: the default solver and the gradient rule.
    head = text.split("\n", 1)[0]
    assert "influence-ekfac" in head and "the library's default" in head and "gradient" in head
    assert "CG stops" not in text and "8 fresh rows" in head
    for section in ("Masking: reference vs held-out protocol", "Controls: recalibration",
                    "Fresh test set: chosen on dev, measured once"):  # fmt: skip
        assert section in text, section
    summary = text.split("## Summary", 1)[1]
    interval = r"[+-]?\d+\.\d\d \[[+-]?\d+\.\d\d, [+-]?\d+\.\d\d\]"
    for method in ("influence-ekfac", "gradient"):
        assert re.search(
            rf"- {method}, chosen and measured on all 24 dev rows.*{interval}", summary
        )
        assert re.search(rf"- {method}, held out .*: {interval}", summary)
        assert re.search(rf"- {method}, beyond recalibration .*{interval} — (shown|not shown|"
                         r"negative)", summary)  # fmt: skip
        assert re.search(rf"- {method}, 8 fresh rows .*gain {interval}", summary)
    assert "one logit offset alone" in summary
    assert (out / "analysis" / "report" / "report.md").is_file()


def test_demo_rerun_reuses_its_records(workspace, demo_output, monkeypatch):  # noqa: F811
    rc, _, out = demo_output
    from mftx.study import protocol

    calls = []
    real = protocol.evaluate_point
    monkeypatch.setattr(protocol, "evaluate_point", lambda *a: calls.append(1) or real(*a))
    assert _demo(workspace, out) == 0 and calls == []


def test_the_header_follows_the_methods_asked_for():
    assert "taylor (−g_val ⊙ θ" in _describe_method("taylor")
    assert "solver minres" in _describe_method("influence-minres")
    assert "default" not in _describe_method("influence-minres")
    ekfac = _describe_method("influence-ekfac")
    assert "the library's default" in ekfac and "(F + λI)" in ekfac and "(H + λI)" not in ekfac
    # A label without a solver takes the run's.
    assert "solver cg" in _describe_method("influence", run_solver="cg")
    assert "the library's default" in _describe_method("influence", run_solver="ekfac")


def test_solve_labels_name_what_was_computed():
    from mftx.study.records import ScoresInfo
    from mftx.study.report.benchmark import solve_label

    short = ScoresInfo("influence", "f", "d", iterations=40, relative_residual=0.63,
                       converged=False)  # fmt: skip
    assert solve_label("influence", short) == "MINRES, 40 it., rel. residual 0.63, stopped short"
    done = ScoresInfo("influence-cg-auto", "f", "d", iterations=12, relative_residual=9.8e-7,
                      converged=True)  # fmt: skip
    assert solve_label("influence-cg-auto", done) == "CG, 12 it., rel. residual 9.8e-07, converged"
    assert solve_label("influence-ekfac", done) == "EK-FAC, closed form"
    assert solve_label("gradient", done) is None
    low = ScoresInfo("influence-lanczos", "f", "d", iterations=60, relative_residual=0.68,
                     converged=True)  # fmt: skip
    assert solve_label("influence-lanczos", low) == (
        "Lanczos low rank, 60 it., 68 % of ∇L_val outside its span"
    )


def test_verdict_claims_only_what_the_interval_supports():
    assert verdict(0.01, 0.05).startswith("shown")
    assert verdict(-0.05, -0.01).startswith("negative")
    assert verdict(-0.01, 0.02).startswith("not shown")
    assert verdict(None, None) == "no interval"
