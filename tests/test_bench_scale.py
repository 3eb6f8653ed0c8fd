"""benchmarks/bench_scale.py on a tiny shape: every workload row, the subprocess peak
measurement, precision options and device placement (CPU through the same path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


QUICK = ["--sizes", "tiny", "--budget", "0.01", "--max-repeats", "1", "--batch", "2",
         "--length", "8"]  # fmt: skip


def test_every_workload_runs_inline_on_the_cpu(bench, capsys):
    rows = bench.main([*QUICK, "--inline"])
    by = {r["workload"]: r for r in rows}
    assert list(by) == list(bench.WORKLOADS)
    optional = {"precision-error": False}  # fp32 run: no precision difference to report
    for name, r in by.items():
        assert r["available"] is optional.get(name, True), (name, r.get("why"))
        if r["available"]:
            assert r["seconds"] > 0 and r["device"] == "cpu" and r["runs"] >= 1
            if name != "precision-error":
                assert r["ratio"] == pytest.approx(r["seconds"] / r["gradient_seconds"])
    assert by["gradient"]["analysed_params"] == 16_832  # 2 blocks of 32-wide BERT
    out = capsys.readouterr().out
    assert f"| gradient (one batch) | {bench._fmt_s(by['gradient']['seconds'])} (" in out


def test_a_workload_in_its_own_process_reports_its_peak(bench, tmp_path):
    rows = bench.main([*QUICK, "--workloads", "gradient,hvp-cached",
                       "--json", str(tmp_path / "s.json")])  # fmt: skip
    for r in rows:
        assert r["available"], r.get("why")
        assert r["peak_bytes"] >= r["base_bytes"] > 0 and r["extra_bytes"] >= 0
    assert (tmp_path / "s.json").read_text().count('"workload"') == 2


def test_bf16_products_keep_float32_state(bench):
    rows = bench.main([*QUICK, "--inline", "--precision", "bf16",
                       "--workloads", "gradient,cg-iteration,precision-error"])  # fmt: skip
    err = next(r for r in rows if r["workload"] == "precision-error")
    assert 1e-5 < err["relative_difference"] < 0.2  # bf16 rounding, not garbage
    assert all(r["available"] and r["precision"] == "bf16" for r in rows)


def test_precision_settings_are_restored(bench):
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    with bench.precision("tf32", torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32
    with bench.precision("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "highest"
    assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == before
    with pytest.raises(ValueError, match="precision must be one of"):
        with bench.precision("fp8", torch.device("cpu")):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_is_refused_clearly_without_a_gpu(bench):
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        bench.main([*QUICK, "--device", "cuda"])


def test_bad_options_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--sizes", "bert-huge"])
    assert "unknown size(s) ['bert-huge']" in capsys.readouterr().err
