"""The fresh test set: unused training rows, choices on dev, measured once (issue 18.4)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _analyze, finetuned, workspace  # noqa: F401  (fixtures)

from mftx.data import load_sst2
from mftx.study.fresh import FreshTest, unused_rows
from mftx.study.heldout import decode_rows
from mftx.study.schema import read_stage


def _used_rows(data, size, seed):
    """Row numbers `mftx.data.load_sst2` draws for a fine-tuning subset, recomputed here."""
    total = len(load_sst2(str(data), None, 0).train)
    return set(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def test_unused_rows_are_disjoint_from_the_fine_tuning_rows_and_seeded(workspace):  # noqa: F811
    _, data, _ = workspace
    meta = {"data": {"seed": 0, "train_size": 32}}
    examples, rows = unused_rows(str(data), meta, 12, draw_seed=5)
    assert len(rows) == 12 == len(set(rows)) and rows == sorted(rows)
    assert not set(rows) & _used_rows(data, 32, 0)
    full = load_sst2(str(data), None, 0).train
    assert examples == [full[i] for i in rows]
    assert unused_rows(str(data), meta, 12, draw_seed=5)[1] == rows  # seeded
    assert unused_rows(str(data), meta, 12, draw_seed=6)[1] != rows
    # Every unused row (16 of 48) when asked for all of them; more is refused by count.
    assert set(unused_rows(str(data), meta, 16, 0)[1]) == set(range(48)) - _used_rows(data, 32, 0)
    with pytest.raises(ValueError, match="17 rows asked, 16 unused rows left"):
        unused_rows(str(data), meta, 17, 0)


def test_unused_rows_refuse_what_they_cannot_know(workspace):  # noqa: F811
    _, data, _ = workspace
    with pytest.raises(ValueError, match="does not say which training rows"):
        unused_rows(str(data), {}, 4, 0)
    with pytest.raises(ValueError, match="fine-tuned on all 48 training rows"):
        unused_rows(str(data), {"data": {"seed": 0, "train_size": None}}, 4, 0)
    with pytest.raises(ValueError, match="fine-tuned on all 48"):
        unused_rows(str(data), {"data": {"seed": 0, "train_size": 48}}, 4, 0)


def test_analyze_measures_dev_choices_once_on_fresh_rows(workspace, finetuned, tmp_path):  # noqa: F811
    _, data, _ = workspace
    out = tmp_path / "an"
    extra = ("--fresh-rows", "12", "--fresh-seed", "2")
    assert _analyze(data, finetuned, out, *extra, methods="gradient,taylor", ks="5,50",
                    samples="0") == 0  # fmt: skip
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    meta = json.loads((ckpt / "mftx.json").read_text())
    used = _used_rows(data, meta["data"]["train_size"], meta["data"]["seed"])
    for method in ("gradient", "taylor"):
        rec = read_stage(out / ckpt.name / f"fresh-{method}.json", "fresh", out)
        fresh: FreshTest = rec.result
        assert rec.complete and len(fresh.rows) == 12 and not set(fresh.rows) & used
        m = fresh.methods[method]
        # The choices are the dev argmaxes (k = 0 a candidate; ties to the smaller k).
        dev = m.dev
        assert set(dev) == {0, 5, 50}
        assert m.best_k == min(dev, key=lambda k: (-dev[k]["accuracy"], k))
        assert m.recal_best_k == min(dev, key=lambda k: (-dev[k]["recalibrated"], k))
        s = fresh.summary(method)
        y = decode_rows(fresh.labels)
        assert s["accuracy"] == pytest.approx(float((decode_rows(m.pred) == y).double().mean()))
        assert s["gain"]["diff"] == pytest.approx(s["accuracy"] - fresh.baseline)
        assert s["gain"]["lo"] <= s["gain"]["diff"] <= s["gain"]["hi"]
        assert s["beyond_recalibration"]["diff"] == pytest.approx(
            m.recal_accuracy - fresh.recalibrated
        )
        if m.best_k == 0:  # no masking chosen: the masked model is the unmasked one
            assert m.pred == fresh.baseline_pred and s["gain"]["diff"] == 0.0
    # The report carries the section; a rerun reuses the records.
    from mftx.study.report import format_tables, load_run

    text = format_tables(load_run(out))
    assert "Fresh test set" in text and "| gradient | 12 |" in text.replace(ckpt.name + " ", "")
    assert _analyze(data, finetuned, out, *extra, methods="gradient,taylor", ks="5,50",
                    samples="0") == 0  # fmt: skip


def test_analyze_refuses_fresh_rows_it_cannot_draw_before_any_work(workspace, finetuned,  # noqa: F811
                                                                   tmp_path, capsys):  # fmt: skip
    _, data, _ = workspace
    out = tmp_path / "an"
    rc = _analyze(data, finetuned, out, "--fresh-rows", "100", methods="gradient", ks="5",
                  samples="0")  # fmt: skip
    assert rc == 1
    assert "100 rows asked, 16 unused rows left" in capsys.readouterr().err
    # Nothing written but the log: no run index, no checkpoint directory.
    assert not (out / "analysis.json").exists() and not [p for p in out.iterdir() if p.is_dir()]
