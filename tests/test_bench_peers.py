"""benchmarks/bench_peers.py: its agreement gate, its table, and (with the `peers` extra
installed) an agreement-only run on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_mismatch_fails_the_run(bench):
    rep = bench.Report({"model": "x"})
    rep.agree("solvers", "x", 1e-9, 1e-8)
    assert rep.ok
    rep.agree("spectrum", "cosine", 0.9, 0.99, "min")
    assert not rep.ok and not rep.to_json()["ok"]
    rep2 = bench.Report({})
    rep2.agree("ekfac", "nan", float("nan"), 1.0)
    assert not rep2.ok


def _run(label_ratio):
    """A run's JSON as the script writes it."""
    meta = {"command": "python benchmarks/bench_peers.py --model minilm", "commit": "abc",
            "model": "minilm", "analysed": 10, "dtype": "float32", "n_train": 16, "n_val": 32,
            "batch": 8, "max_length": 64, "torch": "2.13.0", "threads": 1, "machine": "m",
            "rounds": 2}  # fmt: skip
    return {"meta": meta, "ok": True, "notes": ["n"],
            "agreement": [{"job": "solvers", "what": "x", "value": 1e-5, "limit": 1e-2,
                           "kind": "max", "ok": True}],
            "timing": [{"job": "solvers", "what": "CG", "mftx_s": label_ratio, "peer_s": 1.0,
                        "ratio": label_ratio, "unit": "iteration", "peer": "p"}]}  # fmt: skip


def test_table_puts_ratios_side_by_side(bench, tmp_path):
    before, after = tmp_path / "b.json", tmp_path / "a.json"
    before.write_text(json.dumps(_run(0.85)))
    after.write_text(json.dumps(_run(0.4)))
    out = tmp_path / "t.md"
    assert bench.main(["--table", f"before={before}", f"after={after}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| solvers | CG | 0.85× | 0.40× |" in text
    assert "## before" in text and "## after" in text and "1e-05" in text


def test_agreement_on_a_tiny_model(tmp_path):
    for peer in ("kronfluence", "pyhessian", "curvlinops", "scipy"):
        pytest.importorskip(peer)
    out = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--check-only", "--jobs",
         "solvers,spectrum,flops", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["ok"] and run["timing"] == [] and len(run["agreement"]) >= 10
    whats = " ".join(a["what"] for a in run["agreement"])
    assert "scipy + curvlinops" in whats and "dense eigendecomposition" in whats
    assert "3 right-hand sides" in whats
    # Arithmetic: a kept graph saves the forward and first backward pass of every product
    # (below curvlinops, which recomputes them), and equals PyHessian's kept-graph product.
    flops = {a["what"]: a for a in run["arithmetic"]}
    for curv in ("hessian", "ggn"):
        assert flops[f"{curv} product over the training batches, mftx cached"]["ratio"] < 0.7
    pyh = next(a for w, a in flops.items() if "PyHessian" in w)
    assert pyh["ratio"] == pytest.approx(1.0)
