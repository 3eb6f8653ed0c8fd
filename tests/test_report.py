"""Tests of mftx.report on synthetic run directories built from Python dicts."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from mftx import report
from mftx.report import (
    RunFormatError,
    SweepPoint,
    best_point,
    format_tables,
    load_run,
    pearson,
    spearman,
    write_report,
)

TOTAL = 22_713_986
ANALYSED = 10_637_568
COMMAND = "mftx analyze ckpts/ckpt-60 ckpts/ckpt-75 --data sst2 --out run"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def checkpoint_json(name: str, accuracy: float, target: Optional[float] = 0.6) -> Dict[str, Any]:
    """A checkpoint.json document."""
    return {
        "name": name,
        "path": f"/abs/ckpts/{name}",
        "target": target,
        "metadata": {"accuracy": accuracy, "loss": 0.66, "step": 40, "seed": 0},
        "baseline": {"accuracy": accuracy, "loss": 0.66, "n": 872},
        "total_params": TOTAL,
        "analysed_params": ANALYSED,
    }


def sweep_json(method: str, baseline: float, points: List[tuple]) -> Dict[str, Any]:
    """A sweep-<method>.json document; points are (k, removed, accuracy, loss)."""
    return {
        "method": method,
        "baseline": {"accuracy": baseline, "loss": 0.66},
        "points": [{"k": k, "removed": r, "accuracy": a, "loss": lo} for k, r, a, lo in points],
        "restored_bitwise": True,
    }


def overlap_json(g: int, b: int, both: int) -> Dict[str, Any]:
    """An overlap.json document (FPR NaN when G == 0, as the analysis writes it)."""
    return {
        "gradient_flagged": g,
        "influence_beneficial": b,
        "both": both,
        "false_positive_rate": (g - both) / g if g else math.nan,
        "analysed_params": ANALYSED,
    }


def fidelity_json(summary: Dict[str, tuple]) -> Dict[str, Any]:
    """A fidelity.json document; summary maps method to (spearman, pearson, sign, n)."""
    return {
        "n_samples": 2,
        "samples": [
            {
                "name": "bert.encoder.layer.0.attention.self.query.weight",
                "tensor_index": 0,
                "flat_index": 12,
                "origin": "random",
                "actual": 1.2e-6,
                "predicted": {"gradient": 1.0e-6, "influence": 1.1e-6},
            }
        ],
        "summary": {
            m: {"spearman": s, "pearson": p, "sign_agreement": g, "n": n}
            for m, (s, p, g, n) in summary.items()
        },
    }


def make_run(
    root: Path,
    checkpoints: Dict[str, Dict[str, Any]],
    *,
    config: Optional[Dict[str, Any]] = None,
    names: Optional[List[str]] = None,
    fmt: str = "mftx.analysis/1",
) -> Path:
    """Create RUN_DIR under ``root`` from {checkpoint: {file name: document or raw text}}."""
    run_dir = root / "run"
    run_dir.mkdir()
    index = {
        "format": fmt,
        "config": config if config is not None else {"methods": ["gradient", "influence"]},
        "command": COMMAND,
        "checkpoints": names if names is not None else list(checkpoints),
    }
    (run_dir / "analysis.json").write_text(json.dumps(index))
    for name, files in checkpoints.items():
        (run_dir / name).mkdir()
        for file, doc in files.items():
            text = doc if isinstance(doc, str) else json.dumps(doc)
            (run_dir / name / file).write_text(text)
    return run_dir


# Baseline 0.6 at ckpt-60: influence peaks at k=500 (0.625); gradient never improves and
# its best (0.6, tied at k=100 and k=1000) goes to k=100. ckpt-75: influence ties at
# 0.76 for k=500 and k=1000 (k=500 wins), with fewer candidates than k at the top.
SWEEPS_60 = {
    "influence": [
        (100, 100, 0.61, 0.65),
        (500, 500, 0.625, 0.64),
        (1000, 1000, 0.62, 0.645),
    ],
    "gradient": [(100, 100, 0.6, 0.66), (500, 500, 0.59, 0.67), (1000, 1000, 0.6, 0.66)],
}
SWEEPS_75 = {
    "influence": [(100, 100, 0.75, 0.5), (500, 480, 0.76, 0.49), (1000, 480, 0.76, 0.49)],
    "gradient": [(100, 100, 0.74, 0.52), (500, 500, 0.70, 0.6), (1000, 1000, 0.65, 0.7)],
}


def full_checkpoint(name: str, base: float, sweeps: Dict[str, list], overlap: tuple) -> dict:
    """All files of a fully analysed checkpoint."""
    files: Dict[str, Any] = {"checkpoint.json": checkpoint_json(name, base)}
    for method, points in sweeps.items():
        files[f"sweep-{method}.json"] = sweep_json(method, base, points)
    files["overlap.json"] = overlap_json(*overlap)
    files["fidelity.json"] = fidelity_json(
        {"gradient": (0.5, 0.4, 0.7, 500), "influence": (0.8, math.nan, 0.9, 500)}
    )
    return files


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A complete two-checkpoint run; ckpt-75 has G == 0."""
    return make_run(
        tmp_path,
        {
            "ckpt-60": full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10)),
            "ckpt-75": full_checkpoint("ckpt-75", 0.75, SWEEPS_75, (0, 7, 0)),
        },
    )


def table_rows(table: str) -> List[List[str]]:
    """Body cells of a markdown table (header and alignment rows dropped)."""
    lines = table.strip().splitlines()[2:]
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]


# --------------------------------------------------------------------------- loading


def test_load_run_reads_everything(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.command == COMMAND
    assert [c.name for c in run.checkpoints] == ["ckpt-60", "ckpt-75"]
    c60 = run.checkpoints[0]
    assert c60.baseline.accuracy == 0.6 and c60.baseline.n == 872
    assert c60.total_params == TOTAL and c60.analysed_params == ANALYSED
    assert c60.metadata["step"] == 40 and c60.target == 0.6
    assert set(c60.sweeps) == {"gradient", "influence"}
    assert [p.k for p in c60.sweeps["influence"].points] == [100, 500, 1000]
    assert c60.overlap.both == 10
    assert c60.fidelity.summary["influence"].spearman == 0.8
    assert math.isnan(c60.fidelity.summary["influence"].pearson)
    assert run.incomplete() == []


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*mftx analyze"):
        load_run(tmp_path / "nope")


def test_missing_analysis_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"analysis\.json.*mftx analyze"):
        load_run(tmp_path)


def test_wrong_format(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, {}, fmt="mftx.analysis/9")
    with pytest.raises(RunFormatError, match=r"analysis\.json.*mftx\.analysis/9"):
        load_run(run_dir)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["sweep-gradient.json"] = '{"method": "gradient", "points": ['
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    with pytest.raises(RunFormatError) as info:
        load_run(run_dir)
    assert info.value.path == str(run_dir / "ckpt-60" / "sweep-gradient.json")
    assert "sweep-gradient.json" in str(info.value) and "invalid JSON" in str(info.value)


def test_missing_field_names_the_file(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    del files["overlap.json"]["both"]
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    with pytest.raises(RunFormatError, match=r"overlap\.json: missing field 'both'"):
        load_run(run_dir)


def test_missing_files_reported_as_incomplete(tmp_path: Path) -> None:
    partial = full_checkpoint("ckpt-75", 0.75, SWEEPS_75, (0, 7, 0))
    del partial["sweep-gradient.json"], partial["fidelity.json"], partial["overlap.json"]
    run_dir = make_run(
        tmp_path,
        {"ckpt-60": full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10)), "ckpt-75": partial},
        names=["ckpt-60", "ckpt-75", "ckpt-85"],
    )
    run = load_run(run_dir)
    incomplete = run.incomplete()
    assert any(line.startswith("ckpt-75: sweep-gradient.json missing") for line in incomplete)
    assert any(line.startswith("ckpt-75: fidelity.json missing") for line in incomplete)
    assert any(line.startswith("ckpt-75: overlap.json missing") for line in incomplete)
    assert any(line.startswith("ckpt-85: directory") for line in incomplete)
    assert not any(line.startswith("ckpt-60") for line in incomplete)

    rows = table_rows(report.masking_table(run))
    assert ["ckpt-75", "gradient", "75.0 %", "(missing)"] == rows[3][:4]
    assert rows[4][:4] == ["ckpt-85", "influence", "n/a", "(missing)"]
    assert table_rows(report.overlap_table(run))[1][:2] == ["ckpt-75", "(missing)"]

    out = write_report(run_dir)
    text = (out / "report.md").read_text()
    assert "## Incomplete" in text
    assert "- ckpt-75: fidelity.json missing" in text
    assert (out / "accuracy-ckpt-85.png").is_file()


def test_unrestored_sweep_is_flagged(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["sweep-influence.json"]["restored_bitwise"] = False
    run = load_run(make_run(tmp_path, {"ckpt-60": files}))
    assert any("NOT restored bit for bit" in line for line in run.incomplete())


# --------------------------------------------------------------------------- best point


def test_best_point_prefers_highest_accuracy_then_smallest_k() -> None:
    pts = [SweepPoint(100, 100, 0.7, 0.5), SweepPoint(10, 10, 0.7, 0.6), SweepPoint(5, 5, 0.6, 0)]
    assert best_point(pts).k == 10
    assert best_point([SweepPoint(1, 1, math.nan, 0.0)]) is None
    assert best_point([]) is None


def test_masking_table_cells(run_dir: Path) -> None:
    rows = table_rows(report.masking_table(load_run(run_dir)))
    # share of model: removed / TOTAL as a percentage, three significant digits
    share = {100: "0.000440 %", 480: "0.00211 %", 500: "0.00220 %"}
    assert 100 * 480 / TOTAL == pytest.approx(0.0021132, rel=1e-4)
    assert rows == [
        # influence first; best 0.625 at k=500: +2.50 points
        ["ckpt-60", "influence", "60.0 %", "500", "62.5 %", "+2.50", "500", share[500]],
        # nothing improves: best point still reported, tie 0.6 at k=100 and 1000 -> k=100
        ["ckpt-60", "gradient", "60.0 %", "100", "60.0 %", "0.00", "100", share[100]],
        # tie 0.76 at k=500 and k=1000 -> k=500; removed (480) < k
        ["ckpt-75", "influence", "75.0 %", "500", "76.0 %", "+1.00", "480", share[480]],
        # nothing improves, best below baseline: negative improvement
        ["ckpt-75", "gradient", "75.0 %", "100", "74.0 %", "-1.00", "100", share[100]],
    ]


def test_share_format() -> None:
    assert report.fmt_share(100 * 5000 / TOTAL) == "0.0220 %"
    assert report.fmt_share(100 * 100_000 / TOTAL) == "0.4403 %"
    assert report.fmt_share(100 * 100 / TOTAL) == "0.000440 %"
    assert report.fmt_share(None) == "n/a"


# --------------------------------------------------------------------------- other tables


def test_overlap_table_and_zero_g(run_dir: Path) -> None:
    rows = table_rows(report.overlap_table(load_run(run_dir)))
    assert rows == [
        ["ckpt-60", "40", "100", "10", f"{100 * 30 / 40:.1f} %"],
        ["ckpt-75", "0", "7", "0", "n/a"],
    ]


def test_overlap_with_influence_variants(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["overlap-influence-ggn.json"] = {
        **overlap_json(40, 60, 30),
        "influence_method": "influence-ggn",
    }
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    run = load_run(run_dir)
    ckpt = run.checkpoints[0]
    assert set(ckpt.overlap_variants) == {"influence-ggn"}
    assert ckpt.overlap.influence_method is None  # not recorded in that file
    rows = table_rows(report.overlap_variants_table(run))
    assert rows == [["ckpt-60", "influence-ggn", "40", "60", "30", "25.0 %"]]
    doc = report.run_to_dict(run)["checkpoints"][0]
    assert doc["overlap_variants"]["influence-ggn"]["both"] == 30
    md = report.render_markdown(run, plots=None)
    assert "other influence variants" in md and "| ckpt-60 | influence-ggn | 40 |" in md
    assert "## Overlap with the other influence variants" in report.format_tables(run)
    # Without variant files there is no extra table anywhere.
    (run_dir / "ckpt-60" / "overlap-influence-ggn.json").unlink()
    bare = load_run(run_dir)
    assert report.overlap_variants_table(bare) == ""
    assert "other influence variants" not in report.render_markdown(bare, plots=None)
    # A malformed method name is a format error naming the file.
    bad = {**overlap_json(1, 1, 1), "influence_method": 3}
    (run_dir / "ckpt-60" / "overlap-influence-ggn.json").write_text(json.dumps(bad))
    with pytest.raises(RunFormatError, match=r"overlap-influence-ggn\.json.*influence_method"):
        load_run(run_dir)


def test_fidelity_table(run_dir: Path) -> None:
    rows = table_rows(report.fidelity_table(load_run(run_dir)))
    assert rows[:2] == [
        ["ckpt-60", "influence", "0.800", "n/a", "90.0 %", "500"],
        ["ckpt-60", "gradient", "0.500", "0.400", "70.0 %", "500"],
    ]
    assert len(rows) == 4


def test_format_tables(run_dir: Path) -> None:
    text = format_tables(load_run(run_dir))
    assert text.count("| checkpoint |") == 3
    assert "Incomplete" not in text


# --------------------------------------------------------------------------- report files


def test_write_report_files(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report"
    text = (out / "report.md").read_text()
    assert COMMAND in text
    assert "![ckpt-60](accuracy-ckpt-60.png)" in text
    assert "![all checkpoints](accuracy-all.png)" in text
    assert "Nothing missing." in text
    for name in ("accuracy-ckpt-60.png", "accuracy-ckpt-75.png", "accuracy-all.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name


def test_csv_rows(run_dir: Path, tmp_path: Path) -> None:
    out = write_report(run_dir, tmp_path / "elsewhere")
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "checkpoint",
        "method",
        "k",
        "removed",
        "accuracy",
        "loss",
        "baseline_accuracy",
    ]
    expected = [
        [name, method, str(k), str(r), repr(a), repr(lo), repr(base)]
        for name, base, sweeps in (("ckpt-60", 0.6, SWEEPS_60), ("ckpt-75", 0.75, SWEEPS_75))
        for method in ("influence", "gradient")
        for k, r, a, lo in sweeps[method]
    ]
    assert rows[1:] == expected


def test_json_roundtrip(run_dir: Path) -> None:
    out = write_report(run_dir)
    doc = json.loads((out / "results.json").read_text())  # strict: NaN written as null
    assert doc["format"] == "mftx.report/1" and doc["command"] == COMMAND
    c60, c75 = doc["checkpoints"]
    assert c60["baseline"] == {"accuracy": 0.6, "loss": 0.66, "n": 872}
    points = c60["sweeps"]["influence"]["points"]
    assert [(p["k"], p["removed"], p["accuracy"], p["loss"]) for p in points] == [
        tuple(p) for p in SWEEPS_60["influence"]
    ]
    assert c60["sweeps"]["influence"]["best"]["k"] == 500
    assert c60["masking"][0]["improvement_points"] == pytest.approx(2.5)
    assert c75["overlap"]["false_positive_rate"] is None
    assert c60["fidelity"]["summary"]["influence"]["pearson"] is None
    assert c60["fidelity"]["samples"][0]["flat_index"] == 12
    assert doc["incomplete"] == []


def test_report_without_matplotlib(run_dir: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    out = write_report(run_dir)
    assert not list(out.glob("*.png"))
    assert "matplotlib" in caplog.text
    assert "matplotlib is not installed" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- statistics


def test_pearson_hand_computed() -> None:
    # x - mean = (-1, 0, 1), y - mean = (-2, -1, 3): r = 5 / sqrt(2 * 14)
    assert pearson([1, 2, 3], [1, 2, 6]) == pytest.approx(5 / math.sqrt(28))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_with_ties_hand_computed() -> None:
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5) and
    # (-1.5, -0.5, 0.5, 1.5): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    np.testing.assert_array_equal(report.average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])


def test_constant_and_degenerate_input_is_nan() -> None:
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1, 2, 3], [0.1, 0.1, 0.1]))
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(spearman([1, math.nan, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2], [1, 2, 3])


def test_accepts_tensors() -> None:
    torch = pytest.importorskip("torch")
    x = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float32)
    assert spearman(x, torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(1.0)


def test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, size=40).astype(float)  # many ties
        y = x + rng.normal(size=40)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
