"""Repeated splits (issue 18.3): the held-out protocol on further split seeds, and their summary."""

from __future__ import annotations

import pytest
from test_cli import _analyze, finetuned, workspace  # noqa: F401  (fixtures)

from mftx.study.config import AnalyzeConfig
from mftx.study.heldout import RowSplit
from mftx.study.protocol import Heldout, RepeatedSplits, SplitInfo
from mftx.study.report import format_tables, load_run
from mftx.study.report.heldout_tables import split_rows
from mftx.study.report.summaries import method_summary
from mftx.study.schema import read_stage

ARGS = ("--heldout", "--split-seed", "3", "--split-seeds", "5,6", "--random-draws", "1")
METHODS = "gradient,taylor,influence-ekfac"


def test_repeated_splits_have_their_own_records_and_a_summary(workspace, finetuned, tmp_path):  # noqa: F811
    _, data, _ = workspace
    out = tmp_path / "an"
    assert _analyze(data, finetuned, out, *ARGS, methods=METHODS, ks="5,50", samples="0") == 0
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    ck = out / ckpt.name
    seen = {}
    for seed in (5, 6):
        d = ck / "splits" / f"seed{seed}"
        split: RowSplit = read_stage(d / "split.json", "split", out).result.split
        assert isinstance(read_stage(d / "split.json", "split", out).result, SplitInfo)
        assert split.seed == seed and sorted(split.a + split.b) == list(range(24))
        seen[seed] = split
        # Fold scores of the methods that use the validation gradient; only their folds swept.
        assert (d / "scores-taylor@A.safetensors").is_file()
        assert (d / "scores-influence-ekfac@B.safetensors").is_file()
        assert not (d / "scores-gradient@A.json").exists()
        taylor: Heldout = read_stage(d / "heldout-taylor.json", "heldout", out).result
        assert taylor.score_sets() == ["A", "B"]
        grad: Heldout = read_stage(d / "heldout-gradient.json", "heldout", out).result
        assert grad.score_sets() == ["all"]
        # The random-k control and group fidelity stay on the main split.
        assert not (d / "heldout-random.json").exists() and not (d / "groupfid.json").exists()
    assert seen[5].a != seen[6].a
    # splits.json: every split's numbers, equal to the summaries of its records.
    rs: RepeatedSplits = read_stage(ck / "splits.json", "splits", out).result
    assert rs.seeds == [3, 5, 6]
    for method in ("gradient", "taylor", "influence-ekfac"):
        rows = rs.methods[method]
        assert [r["seed"] for r in rows] == [3, 5, 6]
        for r in rows[1:]:
            d = ck / "splits" / f"seed{r['seed']}"
            h = read_stage(d / f"heldout-{method}.json", "heldout", out).result
            s = method_summary(h, split=seen[r["seed"]])["heldout"]
            assert r["gain"] == pytest.approx(s["mean_gain"])
            assert r["beyond"] == pytest.approx(s["mean_beyond_recalibration"])
            assert r["gain_lo"] <= r["gain"] <= r["gain_hi"]
    # The report: mean, spread and range over the three splits.
    run = load_run(out)
    (taylor_row,) = [r for r in split_rows(run) if r["method"] == "taylor"]
    gains = [r["gain"] for r in rs.methods["taylor"]]
    assert taylor_row["gain_mean"] == pytest.approx(sum(gains) / 3)
    assert (taylor_row["gain_min"], taylor_row["gain_max"]) == (min(gains), max(gains))
    assert "Repeated splits" in format_tables(run)


def test_split_seeds_are_checked_before_any_work():
    with pytest.raises(ValueError, match="differ from split_seed"):
        AnalyzeConfig(methods=["gradient"], heldout=True, split_seeds=[0, 1]).validate()
    with pytest.raises(ValueError, match="distinct"):
        AnalyzeConfig(methods=["gradient"], heldout=True, split_seeds=[1, 1]).validate()
    with pytest.raises(ValueError, match="split_seeds need the held-out protocol"):
        AnalyzeConfig(methods=["gradient"], split_seeds=[1]).validate()
