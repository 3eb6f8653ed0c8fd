"""Tests of mftx.study.report on synthetic run directories written with the run records."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from mftx import fileio
from mftx.study.records import (
    Baseline,
    CheckpointInfo,
    Fidelity,
    FidelitySample,
    FidelityStats,
    Overlap,
    RunIndex,
    ScoresInfo,
    StageRecord,
    Sweep,
    SweepPoint,
    best_point,
)
from mftx.study.report import (
    RunFormatError,
    format_tables,
    load_results,
    load_run,
    render_markdown,
    run_to_dict,
    write_report,
)
from mftx.study.report import tables as report

TOTAL = 22_713_986
ANALYSED = 10_637_568
COMMAND = ["mftx", "analyze", "ckpts/ckpt-60", "--data", "sst2", "--out", "run"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def rec(kind: str, result: Any, state: str = "complete") -> StageRecord:
    return StageRecord(kind, {"data": {"max_length": 64}}, {"weights": "0" * 64}, state, result)


def checkpoint_rec(name: str, accuracy: float, target: Optional[float] = 0.6) -> StageRecord:
    info = CheckpointInfo(
        name=name,
        path=Path("/abs/ckpts") / name,
        target=target,
        baseline=Baseline(accuracy, 0.66, 872),
        total_params=TOTAL,
        analysed_params=ANALYSED,
        metadata={"accuracy": accuracy, "loss": 0.66, "step": 40, "seed": 0},
    )
    return rec("checkpoint", info)


def sweep_rec(method: str, baseline: float, points: List[tuple], **kw: Any) -> StageRecord:
    """A sweep record; points are (k, removed, accuracy, loss)."""
    sweep = Sweep(
        method, Baseline(baseline, 0.66), [SweepPoint(*p) for p in points], kw.get("restored", True)
    )
    return rec("sweep", sweep, kw.get("state", "complete"))


def overlap_rec(g: int, b: int, both: int, method: str = "influence") -> StageRecord:
    return rec(
        "overlap", Overlap.of_counts(g, b, both, analysed_params=ANALYSED, influence_method=method)
    )


def fidelity_rec(summary: Dict[str, tuple], state: str = "complete") -> StageRecord:
    """summary maps method to (spearman, pearson, sign, n)."""
    sample = FidelitySample(
        "bert.encoder.layer.0.attention.self.query.weight", 0, 12, 0.01, 1.2e-6, "random",
        {"gradient": 1.0e-6, "influence": 1.1e-6},
    )  # fmt: skip
    stats = {m: FidelityStats(m, *v) for m, v in summary.items()}
    return rec("fidelity", Fidelity("float64", 2, [sample], stats, 0.66), state)


def solve_rec(method: str, iterations: int, residual: float, reason: str) -> StageRecord:
    info = ScoresInfo(method, f"scores-{method}.safetensors", "f" * 64, 79.4, "hessian", 0.01,
                      16, iterations, residual, False, reason, 3)  # fmt: skip
    return rec("scores", info)


def make_run(
    root: Path,
    checkpoints: Dict[str, Dict[str, Any]],
    *,
    config: Optional[Dict[str, Any]] = None,
    names: Optional[List[str]] = None,
    fmt: Optional[str] = None,
) -> Path:
    """Create RUN_DIR under ``root`` from {checkpoint: {file stem: record or raw text}}."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    config = config if config is not None else {"methods": ["gradient", "influence"]}
    index = RunIndex(config, names if names is not None else list(checkpoints), list(COMMAND))
    doc = index.to_json()
    if fmt is not None:
        doc["format"] = fmt
    fileio.write_json(run_dir / "analysis.json", doc)
    for name, files in checkpoints.items():
        (run_dir / name).mkdir()
        for stem, doc in files.items():
            path = run_dir / name / f"{stem}.json"
            if isinstance(doc, str):
                path.write_text(doc)
            else:
                fileio.write_json(path, doc, root=run_dir)
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
    """All records of a fully analysed checkpoint."""
    files: Dict[str, Any] = {"checkpoint": checkpoint_rec(name, base)}
    for method, points in sweeps.items():
        files[f"sweep-{method}"] = sweep_rec(method, base, points)
    files["overlap-influence"] = overlap_rec(*overlap)
    files["fidelity"] = fidelity_rec(
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
    assert c60.path == Path("/abs/ckpts/ckpt-60")  # relative on disk, absolute in memory
    assert set(c60.sweeps) == {"gradient", "influence"}
    assert [p.k for p in c60.sweeps["influence"].points] == [100, 500, 1000]
    assert c60.overlap.both == 10
    assert c60.fidelity.summary["influence"].spearman == 0.8
    assert math.isnan(c60.fidelity.summary["influence"].pearson)  # restored from null
    assert math.isnan(run.checkpoints[1].overlap.false_positive_rate)
    assert run.incomplete() == []


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*mftx analyze"):
        load_run(tmp_path / "nope")


def test_missing_analysis_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"analysis\.json.*mftx analyze"):
        load_run(tmp_path)


def test_wrong_format(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "a", {}, fmt="mftx.analysis/9")
    with pytest.raises(RunFormatError, match=r"analysis\.json.*mftx\.analysis/9"):
        load_run(run_dir)
    old = make_run(tmp_path / "b", {}, fmt="mftx.analysis/1")
    with pytest.raises(RunFormatError, match=r"older mftx.*--force"):
        load_run(old)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["sweep-gradient"] = '{"format": "mftx.sweep/1", "points": ['
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    with pytest.raises(RunFormatError) as info:
        load_run(run_dir)
    assert info.value.path == str(run_dir / "ckpt-60" / "sweep-gradient.json")
    assert "sweep-gradient.json" in str(info.value) and "invalid JSON" in str(info.value)


def test_missing_field_names_the_file(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    doc = json.loads(fileio.dumps(files["overlap-influence"]))
    del doc["result"]["both"]
    files["overlap-influence"] = json.dumps(doc)
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    with pytest.raises(RunFormatError, match=r"overlap-influence\.json: missing field 'both'"):
        load_run(run_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"method": "gradient", "points": []}', r"no 'format' field.*--force"),
        ('{"format": "mftx.sweep/7"}', r"mftx\.sweep/7.*reads mftx\.sweep/1"),
        ('{"format": "mftx.overlap/1"}', r"holds a 'mftx\.overlap/1' record, expected mftx\.sweep"),
    ],
)
def test_old_or_foreign_records_are_refused(tmp_path: Path, text: str, message: str) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["sweep-gradient"] = text
    with pytest.raises(RunFormatError, match=message):
        load_run(make_run(tmp_path, {"ckpt-60": files}))


def test_missing_and_partial_files_reported_as_incomplete(tmp_path: Path) -> None:
    partial = full_checkpoint("ckpt-75", 0.75, SWEEPS_75, (0, 7, 0))
    del partial["sweep-gradient"], partial["fidelity"], partial["overlap-influence"]
    partial["sweep-influence"] = sweep_rec("influence", 0.75, SWEEPS_75["influence"][:1],
                                           state="partial", restored=None)  # fmt: skip
    run_dir = make_run(
        tmp_path,
        {"ckpt-60": full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10)), "ckpt-75": partial},
        names=["ckpt-60", "ckpt-75", "ckpt-85"],
    )
    run = load_run(run_dir)
    incomplete = run.incomplete()
    assert "ckpt-75: sweep-gradient.json missing (no gradient masking sweep)" in incomplete
    assert "ckpt-75: sweep-influence.json is partial (k = 100 so far)" in incomplete
    assert any(line.startswith("ckpt-75: fidelity.json missing") for line in incomplete)
    assert any(line.startswith("ckpt-75: overlap-influence.json missing") for line in incomplete)
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


def test_partial_fidelity_and_disabled_fidelity(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["fidelity"] = fidelity_rec({}, state="partial")
    run = load_run(make_run(tmp_path / "a", {"ckpt-60": files}))
    assert run.incomplete() == ["ckpt-60: fidelity.json is partial (1 of 2 samples measured)"]
    del files["fidelity"]
    config = {"methods": ["gradient", "influence"], "fidelity_samples": 0}
    run = load_run(make_run(tmp_path / "b", {"ckpt-60": files}, config=config))
    assert run.incomplete() == []  # fidelity was not asked for


def test_unrestored_sweep_is_flagged(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["sweep-influence"] = sweep_rec("influence", 0.6, SWEEPS_60["influence"], restored=False)
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
    chance = f"{100 * (1 - 100 / ANALYSED):.1f} %"  # 1 - B / n
    kappa = Overlap.of_counts(40, 100, 10, analysed_params=ANALYSED).kappa
    assert kappa > 0.1  # 10 shared of 40 and 100 among 10.6M: far above chance
    assert rows[0] == ["ckpt-60", "40", "100", "10", f"{100 * 30 / 40:.1f} %", chance,
                       f"{kappa:.3f}"]  # fmt: skip
    assert rows[1][:5] == ["ckpt-75", "0", "7", "0", "n/a"]


def test_overlap_with_influence_variants(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["overlap-influence-ggn"] = overlap_rec(40, 60, 30, "influence-ggn")
    run_dir = make_run(tmp_path, {"ckpt-60": files})
    run = load_run(run_dir)
    ckpt = run.checkpoints[0]
    assert set(ckpt.overlap_variants) == {"influence-ggn"}
    assert ckpt.primary_influence == "influence"
    rows = table_rows(report.overlap_variants_table(run))
    assert rows[0][:6] == ["ckpt-60", "influence-ggn", "40", "60", "30", "25.0 %"]
    assert rows[0][6] == f"{100 * (1 - 60 / ANALYSED):.1f} %"
    doc = run_to_dict(run)["checkpoints"][0]
    assert doc["records"]["overlap-influence-ggn"]["result"]["both"] == 30
    md = render_markdown(run, None, tmp_path)
    assert "other influence variants" in md and "| ckpt-60 | influence-ggn | 40 |" in md
    assert "## Overlap with the other influence variants" in format_tables(run)
    # Without plain influence the first variant is the main table's.
    (run_dir / "ckpt-60" / "overlap-influence.json").unlink()
    only = load_run(run_dir).checkpoints[0]
    assert only.primary_influence == "influence-ggn" and only.overlap_variants == {}
    # Without variant files there is no extra table anywhere.
    (run_dir / "ckpt-60" / "overlap-influence-ggn.json").unlink()
    bare = load_run(run_dir)
    assert report.overlap_variants_table(bare) == ""
    assert "other influence variants" not in render_markdown(bare, None, tmp_path)
    # A malformed method name is a format error naming the file.
    bad = json.loads(fileio.dumps(overlap_rec(1, 1, 1)))
    bad["result"]["influence_method"] = 3
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


def test_solve_table(tmp_path: Path) -> None:
    files = full_checkpoint("ckpt-60", 0.6, SWEEPS_60, (40, 100, 10))
    files["scores-influence"] = solve_rec("influence", 1, 24.8, "non-positive curvature")
    files["scores-influence"].settings["score"] = {"solver": "cg", "curvature": "hessian"}
    files["scores-influence-ggn"] = solve_rec("influence-ggn", 7, 1e-4, "tolerance")
    gradient = ScoresInfo("gradient", "scores-gradient.safetensors", "e" * 64, 1.0)
    files["scores-gradient"] = rec("scores", gradient)  # no solve: not in the table
    run = load_run(make_run(tmp_path, {"ckpt-60": files}))
    assert table_rows(report.solve_table(run)) == [
        ["ckpt-60", "influence", "hessian", "cg", "0.01", "1", "2.48e+01",
         "non-positive curvature", "79"],
        # A record without solver settings (older runs) shows the solver as missing.
        ["ckpt-60", "influence-ggn", "hessian", "—", "0.01", "7", "1.00e-04", "tolerance", "79"],
    ]  # fmt: skip


def test_format_tables(run_dir: Path) -> None:
    text = format_tables(load_run(run_dir))
    # masking, overlap, fidelity, and the flags read against the measured zeroing effect
    assert text.count("| checkpoint |") == 4 and "Flags against the measured effect" in text
    assert "Incomplete" not in text


# --------------------------------------------------------------------------- report files


def test_write_report_files(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report"
    text = (out / "report.md").read_text()
    assert " ".join(["mftx", "analyze", "ckpts/ckpt-60"]) in text
    ckpt_path = fileio.relative("/abs/ckpts/ckpt-60", out)
    assert ckpt_path.startswith("../") and ckpt_path.endswith("/abs/ckpts/ckpt-60")
    assert "Run directory: `..`" in text and f"`{ckpt_path}`" in text
    assert "![ckpt-60](accuracy-ckpt-60.png)" in text
    assert "![all checkpoints](accuracy-all.png)" in text
    assert "Nothing missing." in text
    for name in ("accuracy-ckpt-60.png", "accuracy-ckpt-75.png", "accuracy-all.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


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


def test_results_json_is_strict_and_rebuilds_the_report(run_dir: Path, tmp_path: Path) -> None:
    out = write_report(run_dir)
    text = (out / "results.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard token {c}"))
    assert doc["format"] == "mftx.report/2" and doc["analysis"]["command"] == COMMAND
    assert doc["run_dir"] == ".."
    c60, c75 = doc["checkpoints"]
    info = c60["records"]["checkpoint"]["result"]
    assert info["baseline"] == {"accuracy": 0.6, "loss": 0.66, "n": 872}
    assert info["path"] == fileio.relative("/abs/ckpts/ckpt-60", out)
    points = c60["records"]["sweep-influence"]["result"]["points"]
    assert [(p["k"], p["removed"], p["accuracy"], p["loss"]) for p in points] == [
        tuple(p) for p in SWEEPS_60["influence"]
    ]
    assert c60["masking"][0]["best"]["k"] == 500
    assert c60["masking"][0]["improvement_points"] == pytest.approx(2.5)
    # NaN is written as null, and where and why is recorded.
    assert c75["records"]["overlap-influence"]["result"]["false_positive_rate"] is None
    ptr = "/checkpoints/1/records/overlap-influence/result/false_positive_rate"
    assert doc["non_finite"][ptr] == "nan"
    assert doc["incomplete"] == []
    # Rebuilt from results.json alone (another directory): the same tables and files.
    run = load_results(out / "results.json")
    assert math.isnan(run.checkpoints[1].overlap.false_positive_rate)
    assert format_tables(run) == format_tables(load_run(run_dir))
    again = write_report(out / "results.json", tmp_path / "x" / "y")
    assert (again / "results.csv").read_text() == (out / "results.csv").read_text()
    tables = [(d / "report.md").read_text().split("## Masking")[1] for d in (out, again)]
    assert tables[0] == tables[1]  # (the paths above them differ: other directory)
    # The run directory, relative to the new report.
    assert json.loads((again / "results.json").read_text())["run_dir"] == "../../run"


def test_report_without_matplotlib(run_dir: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    out = write_report(run_dir)
    assert not list(out.glob("*.png"))
    assert "matplotlib" in caplog.text
    assert "matplotlib is not installed" in (out / "report.md").read_text()


DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_committed_results_are_portable_and_rebuild_their_report() -> None:
    """docs/results (and each report below it) names no machine path, and every report.md
    is what its results.json gives."""
    import re

    for f in DOCS.rglob("*"):
        if f.suffix in (".json", ".md", ".csv", ".sh"):
            assert not re.search(r"(?<![\w.])/(work|root|home|tmp|Users)/", f.read_text()), f
    reports = sorted(DOCS.rglob("results.json"))
    assert DOCS / "results.json" in reports
    for results in reports:
        run = load_results(results)
        assert run.checkpoints, results  # a report still running lists what is missing
        plots = sorted(results.parent.glob("*.png"))
        text = (results.parent / "report.md").read_text()
        assert render_markdown(run, plots, results.parent) == text, results


def _summarize():
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", DOCS / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: The pages that quote the study, and their sections whose every table must be lines of the
#: committed summaries. Anywhere else on these pages, a table whose header row is a summary's
#: header row counts as a quote too. (docs/benchmarks.md's spectra of the demo's checkpoints
#: share a header with the study's but come from benchmarks/checkpoint_curvature.py.)
QUOTING_SECTIONS = {
    "README.md": ["## Results"],
    "docs/results.md": ["## Across fine-tuning seeds"],
    "docs/solvers.md": ["## Methods benchmark", "## The study's curvature"],
}


def _tables(text: str) -> List[List[str]]:
    """The markdown tables of `text`, each as its lines (header, rule, rows)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _section(text: str, heading: str) -> str:
    text = "\n" + text
    assert f"\n{heading}\n" in text, heading
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def quoted_table_problems(text: str, headings: List[str], summaries: List[str]) -> List[str]:
    """Lines of `text`'s study tables that are no line of a committed summary. Study
    tables: every table under one of `headings`, and every table with a summary's header."""
    lines = [set(s.splitlines()) for s in summaries]
    headers = {t[0] for s in summaries for t in _tables(s)}
    forced = ["\n".join(t) for h in headings for t in _tables(_section(text, h))]
    problems = []
    for table in _tables(text):
        if table[0] in headers or "\n".join(table) in forced:
            problems += [row for row in table if not any(row in s for s in lines)]
    return problems


def test_quoted_table_check_catches_stale_rows() -> None:
    summary = "| a | b |\n| :-- | --: |\n| x | 1 |\n| y | 2 |\n"
    page = "## Results\n\n| a | b |\n| :-- | --: |\n| x | 1 |\n"
    assert quoted_table_problems(page, ["## Results"], [summary]) == []
    assert quoted_table_problems(page.replace("| 1 |", "| 3 |"), [], [summary]) == ["| x | 3 |"]
    other = "| c |\n| :-- |\n| z |\n"  # not a summary's table: free outside the sections
    assert quoted_table_problems("## Other\n" + other, [], [summary]) == []
    assert quoted_table_problems("## Results\n" + other, ["## Results"], [summary])
    assert quoted_table_problems("## Results\n" + other, [], [summary]) == []
    # a summary's header marks a quote outside the sections too
    assert quoted_table_problems("## Other\n\n| a | b |\n| w | 9 |\n", [], [summary])


def test_quoted_results_tables_are_the_committed_summaries() -> None:
    """Every study table the README and the docs pages quote is lines of the committed
    summary.md files, and each summary.md is what docs/results/summarize.py gives from the CSVs
    beside it (so regenerating the results makes a stale quote fail here)."""
    mod = _summarize()
    summaries = []
    for md in sorted(DOCS.rglob("summary.md")):
        text = md.read_text()
        assert mod.summary(md.parent) == text, md
        summaries.append(text)
    assert len(summaries) >= 2  # the main run and the methods benchmark
    root = DOCS.parents[1]
    headers = {t[0] for s in summaries for t in _tables(s)}
    quoted = 0
    for name, headings in QUOTING_SECTIONS.items():
        page = root / name
        text = page.read_text()
        problems = quoted_table_problems(text, headings, summaries)
        assert not problems, (page, problems[:3])
        quoted += sum(len(t) for t in _tables(text) if t[0] in headers)
    assert quoted > 40


@pytest.mark.parametrize(
    "name", ["reproduce.sh", "reproduce-i12.sh", "rerun-60.sh", "solves-60.sh"]
)
def test_results_script_parses_and_uses_only_real_options(name: str) -> None:
    """Each script of docs/results/ is valid bash, sources the shared preamble, and each
    `mftx <command>` line in it passes only options that command's parser knows (a
    renamed flag fails here, not hours in)."""
    import argparse
    import re
    import subprocess

    from mftx.cli import build_parser

    script = DOCS / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert 'source "$(dirname "$0")/_env.sh"' in script.read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    # Logical lines (continuations joined); arrays of options are checked against analyze.
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    text = re.sub(r"\(\s*\n\s*", "(", text)
    text = re.sub(r"\n\s+(?=--)", " ", text)
    used = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        m = re.search(r'"\$MFTX" (\w+)', line)
        command = m.group(1) if m else ("analyze" if re.match(r"\s*\w+=\(--", line) else None)
        if command is None:
            continue
        assert command in known, line
        used.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert "analyze" in used
    if name == "reproduce.sh":
        assert {"finetune", "analyze", "report"} <= set(used)
        # A misspelt stage stops before any work, naming the stage.
        bad = subprocess.run(
            ["bash", str(script), "/nonexistent/run", "finetune-1k", "analyse-1k"],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "unknown stage: analyse-1k" in bad.stderr
    for command, options in used.items():
        assert options <= known[command], (command, sorted(options - known[command]))


def test_overlap_agreement_against_chance_by_hand() -> None:
    from mftx.study.records import Overlap

    # n = 100: G = 40, B = 50, both = 20 -> independent flags by construction.
    o = Overlap.of_counts(40, 50, 20, analysed_params=100)
    assert o.false_positive_rate == 0.5 and o.chance_rate == 0.5
    assert o.kappa == pytest.approx(0.0, abs=1e-12)
    # Same sets: κ = 1; disjoint halves: κ = -1.
    assert Overlap.of_counts(50, 50, 50, analysed_params=100).kappa == pytest.approx(1.0)
    assert Overlap.of_counts(50, 50, 0, analysed_params=100).kappa == pytest.approx(-1.0)
    # By hand: G = 30, B = 40, both = 25, n = 100: p_o = (25 + 55) / 100, p_e = .3*.4 + .7*.6
    assert Overlap.of_counts(30, 40, 25, analysed_params=100).kappa == pytest.approx(
        (0.8 - 0.54) / (1 - 0.54)
    )
    assert math.isnan(Overlap.of_counts(30, 40, 25).kappa)  # no n: undefined, not guessed
