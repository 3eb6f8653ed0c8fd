"""The held-out protocol end to end on a tiny BERT, and its summaries on hand-made records."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_cli import _analyze, _run, finetuned, workspace  # noqa: F401  (fixtures)

import mftx
from mftx.models import load_classifier
from mftx.ops.indexing import FlatIndex
from mftx.study import groups, protocol
from mftx.study.heldout import DevRows, RowSplit, best_offset, row_metrics
from mftx.study.protocol import Heldout, ProtocolPoint, RowStats

HELDOUT = (
    "--heldout", "--split-seed", "3", "--random-draws", "2", "--group-subsets", "3",
    "--group-ks", "2,20", "--group-flagged", "1", "--group-quadratic", "1",
    "--location-ks", "5",
)  # fmt: skip
METHODS = "gradient,influence,taylor,magnitude"


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def heldout_run(workspace, finetuned):  # noqa: F811
    root, data, _ = workspace
    out = root / "heldout"
    assert _analyze(data, finetuned, out, *HELDOUT, methods=METHODS, ks="5,50", samples="4") == 0
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    return root, data, out, ckpt


def _masked_logits(model, rows, space, cands):
    with mftx.masked(space, cands):
        return rows.logits(model)


def test_split_scores_and_sweeps_are_recorded_per_half(heldout_run):
    root, data, out, ckpt = heldout_run
    ck = out / ckpt.name
    split = RowSplit.from_json(_json(ck / "split.json")["result"])  # hashes checked
    assert split.seed == 3 and not set(split.a) & set(split.b)
    assert sorted(split.a + split.b) == list(range(24))
    # Methods that use the validation gradient get scores from each half; the others do not.
    for m in ("influence", "taylor"):
        for h in ("A", "B"):
            rec = _json(ck / f"scores-{m}@{h}.json")
            assert rec["settings"]["rows"]["half"] == h
            assert (ck / f"scores-{m}@{h}.safetensors").is_file()
    assert not (ck / "scores-gradient@A.json").exists()
    # The influence method's three systems (all rows, fold A, fold B) were one solve: one
    # curvature product per iteration for the three (tests/test_multi_rhs.py: each answer
    # equals its own solve).
    for h in ("", "@A", "@B"):
        st = mftx.Scores.load(ck / f"scores-influence{h}.safetensors").stats
        assert st["shared_solve"] == ["all", "A", "B"]
    taylor = protocol.Heldout.from_json(
        mftx.fileio.Reader(_json(ck / "heldout-taylor.json")["result"], "x")
    )
    assert taylor.score_sets() == ["A", "B", "all"] and taylor.restored_bitwise
    grad = _json(ck / "heldout-gradient.json")["result"]
    assert {p["scores"] for p in grad["points"]} == {"all"}
    rand = _json(ck / "heldout-random.json")["result"]
    assert sorted({p["scores"] for p in rand["points"]}) == ["draw0", "draw1"]

    # One point against a direct evaluation: taylor's A-scores, top-5 masked, rows B.
    model, tok = load_classifier(str(ckpt))
    from mftx.data import load_sst2

    dev = load_sst2(str(data), 32, 0, tokenizer=tok).dev
    rows = DevRows(dev, tok, 64)
    space = mftx.select_params(model)
    s = mftx.Scores.load(ck / "scores-taylor@A.safetensors")
    logits = _masked_logits(model, rows, space, s.candidates(5))
    point = taylor.curve("A")[5]
    want = row_metrics(logits, rows.labels, split.b)
    assert point.rows["B"].accuracy == want["accuracy"]
    assert point.rows["B"].loss == pytest.approx(want["loss"], rel=1e-9)
    off = best_offset(logits, rows.labels, split.a)
    assert point.recal["A->B"] == row_metrics(logits, rows.labels, split.b, offset=off)["accuracy"]


def test_group_fidelity_matches_brute_force_zeroing(heldout_run):
    root, data, out, ckpt = heldout_run
    ck = out / ckpt.name
    rec = _json(ck / "groupfid.json")
    assert rec["state"] == "complete" and rec["settings"]["rows"] == "B"
    gf = rec["result"]
    origins = {(s["origin"], s["k"]) for s in gf["samples"]}
    assert ("random", 2) in origins and ("top-taylor", 20) in origins
    assert ("flagged-gradient", 2) in origins
    assert all("magnitude" not in s["predicted"] for s in gf["samples"])
    quad = [s for s in gf["samples"] if s["quadratic"] is not None]
    assert len(quad) == 2 and all(s["origin"] == "random" for s in quad)  # one per k
    assert "random+quadratic" in gf["summary"]["taylor"]
    assert set(gf["summary"]["influence"]["random k=2"]) >= {"spearman", "spearman_interval"}

    # Re-measure two samples by hand: float64 copy, subset zeroed, loss on rows B.
    model, tok = load_classifier(str(ckpt))
    model = copy.deepcopy(model).double().eval()
    from mftx.data import load_sst2

    dev = load_sst2(str(data), 32, 0, tokenizer=tok).dev
    rows = DevRows(dev, tok, 64)
    split = RowSplit.from_json(_json(ck / "split.json")["result"])
    space = mftx.select_params(model)
    layout = FlatIndex(space.numels)
    taylor = mftx.Scores.load(ck / "scores-taylor@A.safetensors")
    subs = {
        x.key(): x
        for x in groups.draw(
            layout.total, [2, 20], 3, 3, ranked={"taylor": _glob(layout, taylor.candidates(20))}
        )
    }

    def loss_b():
        total = 0.0
        with torch.no_grad():
            for b in rows.batches_for(split.b):
                z = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                total += float(F.cross_entropy(z, b["labels"], reduction="sum"))
        return total / len(split.b)

    base = loss_b()
    assert gf["base_loss"] == pytest.approx(base, rel=1e-12)
    checked = 0
    for sample in gf["samples"]:
        if sample["key"] not in subs:
            continue
        sub = subs[sample["key"]]
        with mftx.masked(space, groups.to_candidates(sub.index, space.numels)):
            actual = loss_b() - base
        assert sample["actual"] == pytest.approx(actual, rel=1e-9, abs=1e-15)
        pred = torch.cat([t.reshape(-1).double() for t in taylor.tensors()])[sub.index].sum()
        assert sample["predicted"]["taylor"] == pytest.approx(float(pred))
        checked += 1
    assert checked >= 3


def _glob(layout, c):
    return layout.to_global(c.tensor_index, c.flat_index)


def test_locations_count_every_entry(heldout_run):
    root, data, out, ckpt = heldout_run
    loc = _json(out / ckpt.name / "location-gradient.json")["result"]
    assert sum(loc["sets"]["top-5"]["kind"].values()) == 5
    total = sum(loc["totals"]["kind"].values())
    model, _ = load_classifier(str(ckpt))
    assert total == mftx.select_params(model).numel
    assert set(loc["totals"]["kind"]) <= {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
    assert "flagged" in loc["sets"]
    assert "flagged" not in _json(out / ckpt.name / "location-magnitude.json")["result"]["sets"]


def _with(args, flag, value):
    i = args.index(flag)
    return (*args[: i + 1], value, *args[i + 2 :])


def test_rerun_reuses_and_more_draws_add_only_them(heldout_run, monkeypatch):
    root, data, out, ckpt = heldout_run
    calls = []
    real = protocol.evaluate_point
    monkeypatch.setattr(protocol, "evaluate_point", lambda *a: calls.append(1) or real(*a))
    measured = []
    real_measure = groups.measure
    monkeypatch.setattr(
        groups, "measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k)
    )
    args = (data, root / "ft", out)
    assert _analyze(*args, *HELDOUT, methods=METHODS, ks="5,50", samples="4") == 0
    assert calls == [] and measured == []
    more = _with(HELDOUT, "--random-draws", "3")
    assert _analyze(*args, *more, methods=METHODS, ks="5,50", samples="4") == 0
    assert len(calls) == 2  # draw2 at k = 5 and 50; nothing else
    rand = _json(out / ckpt.name / "heldout-random.json")["result"]
    assert sorted({p["scores"] for p in rand["points"]}) == ["draw0", "draw1", "draw2"]
    # Another split seed is refused, naming it.
    other = _with(more, "--split-seed", "4")
    assert _analyze(*args, *other, methods=METHODS, ks="5,50", samples="4") == 1


def test_heldout_options_need_the_protocol(workspace, finetuned, tmp_path, capsys):  # noqa: F811
    root, data, _ = workspace
    rc = _analyze(data, finetuned, tmp_path / "x", "--random-draws", "2")
    assert rc == 1 and "heldout" in capsys.readouterr().err


# ------------------------------------------------------------------ summaries, by hand


def _stats(acc):
    return RowStats(acc, 0.5, [0.5, 0.5], 10)


def _pt(scores, k, a, b, allrows, recal=(0.0, 0.0)):
    rows = {"all": _stats(allrows), "A": _stats(a), "B": _stats(b)}
    return ProtocolPoint(scores, k, k, rows, {"A->B": recal[0], "B->A": recal[1]})


def test_summaries_choose_on_one_half_and_measure_on_the_other():
    base = _pt("none", 0, 0.6, 0.6, 0.6, recal=(0.7, 0.65))
    h = Heldout("m", base, [
        _pt("all", 10, 0.9, 0.9, 0.95), _pt("all", 100, 0.6, 0.6, 0.5),
        # A-scores: best on A at k = 100 (0.8), where B is 0.55; k = 10 is better on B.
        _pt("A", 10, 0.7, 0.75, 0.7), _pt("A", 100, 0.8, 0.55, 0.7, recal=(0.66, 0.0)),
        _pt("B", 10, 0.61, 0.62, 0.6), _pt("B", 100, 0.64, 0.63, 0.6, recal=(0.0, 0.69)),
    ])  # fmt: skip
    ref = protocol.reference_summary(h, fixed_k=100)
    assert ref["best_k"] == 10 and ref["gain"] == pytest.approx(0.35)
    assert ref["gain_at_fixed_k"] == pytest.approx(-0.1)
    held = protocol.heldout_summary(h, fixed_k=100)
    ab, ba = held["folds"]
    assert (ab["best_k"], ab["accuracy"], ab["gain"]) == (100, 0.55, pytest.approx(-0.05))
    assert ab["beyond_recalibration"] == pytest.approx(0.55 - 0.7)
    assert ab["masked_recalibrated"] == 0.66
    assert (ba["best_k"], ba["accuracy"]) == (100, 0.64)
    assert ba["beyond_recalibration"] == pytest.approx(0.64 - 0.65)
    assert held["mean_gain"] == pytest.approx((-0.05 + 0.04) / 2)
    # A method without fold scores selects with its one score set.
    h2 = Heldout("g", base, [_pt("all", 10, 0.9, 0.5, 0.7), _pt("all", 100, 0.6, 0.8, 0.7)])
    f = protocol.heldout_summary(h2)["folds"]
    assert f[0]["scores"] == "all" and (f[0]["best_k"], f[0]["accuracy"]) == (10, 0.5)
    assert (f[1]["best_k"], f[1]["accuracy"]) == (100, 0.6)
    assert f[0]["at_fixed_k"] is None  # no k = 5000 point


def test_random_summary_means_and_spreads():
    base = _pt("none", 0, 0.6, 0.6, 0.6)
    h = Heldout("random", base, [
        _pt("draw0", 10, 0.6, 0.7, 0.6), _pt("draw1", 10, 0.8, 0.5, 0.6),
        _pt("draw0", 20, 0.65, 0.6, 0.6), _pt("draw1", 20, 0.65, 0.6, 0.6),
    ])  # fmt: skip
    r = protocol.random_summary(h, fixed_k=20)
    assert r["per_k"][10]["A"]["mean"] == pytest.approx(0.7)
    assert r["per_k"][10]["B"]["sd"] == pytest.approx(0.1414213562, rel=1e-6)
    ab = r["folds"][0]
    assert ab["best_k"] == 10 and ab["accuracy"] == pytest.approx(0.6)
    assert r["at_fixed_k"]["draws"] == 2
