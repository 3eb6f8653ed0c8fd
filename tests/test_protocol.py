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
from mftx.study.fidelity import implied_change
from mftx.study.heldout import DevRows, RowSplit, best_offset, encode_rows, row_metrics, two_fold
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
    assert rec["state"] == "complete" and rec["settings"]["rows"] == "A+B"
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

    def summed(half):
        total = 0.0
        with torch.no_grad():
            for b in rows.batches_for(half):
                z = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                total += float(F.cross_entropy(z, b["labels"], reduction="sum"))
        return total

    def losses():
        a, b = summed(split.a), summed(split.b)
        return {"A": a / len(split.a), "B": b / len(split.b), "all": (a + b) / 24}

    base = losses()
    assert gf["base_loss"] == pytest.approx(base["B"], rel=1e-12)
    assert gf["base_losses"] == pytest.approx(base, rel=1e-12)

    def flat(name):
        s = mftx.Scores.load(ck / f"scores-{name}.safetensors")
        return torch.cat([t.reshape(-1).double() for t in s.tensors()])

    taylor_sets = {"A": flat("taylor@A"), "B": flat("taylor@B"), "all": flat("taylor")}
    gradient_pred = torch.cat([t.reshape(-1).double() for t in implied_change(
        mftx.Scores.load(ck / "scores-gradient.safetensors"))])  # fmt: skip
    checked = 0
    for sample in gf["samples"]:
        if sample["key"] not in subs:
            continue
        sub = subs[sample["key"]]
        with mftx.masked(space, groups.to_candidates(sub.index, space.numels)):
            now = losses()
        actual = {n: now[n] - base[n] for n in now}
        assert sample["actual"] == pytest.approx(actual["B"], rel=1e-9, abs=1e-15)
        assert sample["actual_rows"] == pytest.approx(actual, rel=1e-9, abs=1e-15)
        # Every score set's prediction: taylor's from its own set, the gradient rule's
        # (no validation gradient) from its one set whatever the direction.
        assert sample["predicted"]["taylor"] == pytest.approx(
            float(taylor_sets["A"][sub.index].sum())
        )
        for n in ("B", "all"):
            want = float(taylor_sets[n][sub.index].sum())
            assert sample["predicted_sets"][n]["taylor"] == pytest.approx(want)
            assert sample["predicted_sets"][n]["gradient"] == sample["predicted"]["gradient"]
        assert sample["predicted"]["gradient"] == pytest.approx(
            float(gradient_pred[sub.index].sum())
        )
        checked += 1
    assert checked >= 3
    # Directions: each summary group against a direct Spearman over its pairs.
    samples = [groups.GroupSample.from_json(mftx.fileio.Reader(x, "x")) for x in gf["samples"]]
    for d, (scores, measured) in groups.DIRECTIONS.items():
        pick = [x for x in samples if x.origin == "random" and x.k == 20]
        pred = [(x.predicted if scores == "A" else x.predicted_sets[scores])["taylor"]
                for x in pick]  # fmt: skip
        act = [x.actual_rows[measured] for x in pick]
        group = "random k=20" if d == "A→B" else f"random k=20 {d}"
        got = gf["summary"]["taylor"][group]
        assert got["n"] == 3 and got["spearman"] == pytest.approx(
            groups.statistics.spearman(pred, act), nan_ok=True
        )


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


def _pt(scores, k, a, b, allrows, recal=(0.0, 0.0), own=None):
    rows = {"all": _stats(allrows), "A": _stats(a), "B": _stats(b)}
    own = {} if own is None else {"A->B": own[0], "B->A": own[1]}
    return ProtocolPoint(scores, k, k, rows, {"A->B": recal[0], "B->A": recal[1]}, own)


def test_summaries_choose_on_one_half_and_measure_on_the_other():
    # own = (accuracy on A after A's offset, accuracy on B after B's offset)
    base = _pt("none", 0, 0.6, 0.6, 0.6, recal=(0.7, 0.65), own=(0.72, 0.66))
    h = Heldout("influence", base, [
        _pt("all", 10, 0.9, 0.9, 0.95), _pt("all", 100, 0.6, 0.6, 0.5),
        # A-scores: best on A at k = 100 (0.8), where B is 0.55; k = 10 is better on B.
        # After A's own offset k = 10 is best on A (0.75): its recalibrated B is 0.71.
        _pt("A", 10, 0.7, 0.75, 0.7, recal=(0.71, 0.0), own=(0.75, 0.0)),
        _pt("A", 100, 0.8, 0.55, 0.7, recal=(0.66, 0.0), own=(0.74, 0.0)),
        # B-scores: after B's offset nothing beats the unmasked model (0.66): k = 0.
        _pt("B", 10, 0.61, 0.62, 0.6, own=(0.0, 0.6)),
        _pt("B", 100, 0.64, 0.63, 0.6, recal=(0.0, 0.69), own=(0.0, 0.65)),
    ])  # fmt: skip
    ref = protocol.reference_summary(h, fixed_k=100)
    assert ref["best_k"] == 10 and ref["gain"] == pytest.approx(0.35)
    assert ref["gain_at_fixed_k"] == pytest.approx(-0.1)
    assert ref["gain_ci"] is None  # no per-row predictions in these records
    held = protocol.heldout_summary(h, fixed_k=100)
    ab, ba = held["folds"]
    assert (ab["best_k"], ab["accuracy"], ab["gain"]) == (100, 0.55, pytest.approx(-0.05))
    assert ab["vs_recalibrated_baseline"] == pytest.approx(0.55 - 0.7)  # the old column
    # Fair: k chosen after A's own offset (10), both sides recalibrated with A's offsets.
    assert (ab["recal_best_k"], ab["masked_recalibrated"]) == (10, 0.71)
    assert ab["beyond_recalibration"] == pytest.approx(0.71 - 0.7)
    assert (ba["best_k"], ba["accuracy"]) == (100, 0.64)
    assert ba["recal_best_k"] == 0 and ba["beyond_recalibration"] == 0.0  # unmasked: exactly 0
    assert held["mean_gain"] == pytest.approx((-0.05 + 0.04) / 2)
    assert held["mean_beyond_recalibration"] == pytest.approx(0.01 / 2)
    # A method without fold scores selects with its one score set.
    h2 = Heldout("gradient", base, [_pt("all", 10, 0.9, 0.5, 0.7), _pt("all", 100, 0.6, 0.8, 0.7)])
    f = protocol.heldout_summary(h2)["folds"]
    assert f[0]["scores"] == "all" and (f[0]["best_k"], f[0]["accuracy"]) == (10, 0.5)
    assert (f[1]["best_k"], f[1]["accuracy"]) == (100, 0.6)
    assert f[0]["at_fixed_k"] is None  # no k = 5000 point
    # Records without recal_self: k for the recalibrated column is the uncalibrated choice.
    assert "without recal_self" in f[0]["recal_rule"] and f[0]["recal_best_k"] == 10
    # k = 0 is a candidate: when every k loses on the selection half, nothing is masked.
    h3 = Heldout("gradient", base, [_pt("all", 10, 0.5, 0.5, 0.5, own=(0.5, 0.5))])
    f = protocol.heldout_summary(h3)["folds"]
    assert [x["best_k"] for x in f] == [0, 0] and [x["gain"] for x in f] == [0.0, 0.0]


def test_a_validation_method_without_its_fold_scores_is_an_error_not_a_leak():
    base = _pt("none", 0, 0.6, 0.6, 0.6)
    h = Heldout("influence-ekfac", base, [_pt("all", 10, 0.9, 0.9, 0.9),
                                          _pt("A", 10, 0.7, 0.7, 0.7)])  # fmt: skip
    with pytest.raises(protocol.MissingFoldScores, match=r"influence-ekfac.*score set 'B'"):
        protocol.heldout_summary(h)
    assert protocol.fold_scores(h, "A") == "A"
    g = Heldout("taylor", base, [_pt("all", 10, 0.9, 0.9, 0.9)])  # taylor uses ∇L_val too
    with pytest.raises(protocol.MissingFoldScores):
        protocol.fold_scores(g, "A")
    assert protocol.fold_scores(Heldout("magnitude", base, []), "A") == "all"


@pytest.fixture
def tiny_split_logits():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (60,), generator=gen)
    logits = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    logits[:, 1] -= 1.0  # biased toward class 0: recalibration helps
    return logits, y, two_fold(y.tolist(), 0)


def test_fair_recalibration_of_a_method_that_changes_nothing_is_zero(tiny_split_logits):
    """Masking that leaves every prediction unchanged scores 0 beyond recalibration, while
    the old column scores minus the whole recalibration gain; intervals from the predictions."""
    logits, y, split = tiny_split_logits
    ev = protocol.measure_logits(logits, y, split)
    base = protocol._point("none", 0, 0, ev)
    same = [protocol._point("all", k, k, ev) for k in (10, 100)]
    h = Heldout("magnitude", base, same, True, encode_rows(y))
    held = protocol.heldout_summary(h, rows_of={"A": split.a, "B": split.b})
    for fold in held["folds"]:
        assert fold["beyond_recalibration"] == 0.0 and fold["recal_best_k"] == 0
        assert fold["vs_recalibrated_baseline"] == pytest.approx(-(fold["recalibrated"]
                                                                   - fold["baseline"]))  # fmt: skip
        ci = fold["beyond_recalibration_ci"]
        assert (ci["lo"], ci["hi"], ci["mcnemar_p"]) == (0.0, 0.0, 1.0)
    assert held["mean_gain_ci"]["n"] == len(y)
    assert any(f["recalibrated"] > f["baseline"] for f in held["folds"])  # the control bites


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
    # k = 0 is a candidate: B->A picks no masking (0.6 on B beats 0.6 / 0.6 by the smaller k).
    ba = r["folds"][1]
    assert ba["best_k"] == 0 and ba["gain"] == 0.0 and ba["sd"] == 0.0


# ------------------------------------------------------------------ sensitivity of truncations


def test_truncation_families_group_labels_by_everything_but_the_count():
    from mftx.study.config import AnalyzeConfig
    from mftx.study.sensitivity import families

    cfg = AnalyzeConfig(max_iter=100, rank=20)
    got = families(["influence", "influence-minres-it200", "influence-ekfac", "gradient",
                    "influence-ggn-it5", "influence-lanczos-r100", "influence-lanczos",
                    "influence-cg-it10"], cfg)  # fmt: skip
    assert got == {
        "influence": ("max_iter", [(100, "influence"), (200, "influence-minres-it200")]),
        "influence-lanczos": ("rank", [(20, "influence-lanczos"), (100, "influence-lanczos-r100")]),
    }  # a family of one (GGN, CG) is no comparison


def test_sensitivity_records_overlap_and_change_between_truncations(workspace, finetuned, tmp_path):  # noqa: F811
    from mftx.study import sensitivity
    from mftx.study.report import load_run
    from mftx.study.report.sensitivity_tables import sensitivity_rows, sensitivity_table

    root, data, _ = workspace
    out = tmp_path / "sens"
    methods = "influence-minres-it2,influence-minres-it6,influence-lanczos-r2,influence-lanczos-r3"
    rc = _analyze(data, finetuned, out, "--heldout", "--location-ks", "5,40", "--tol", "0", methods=methods,
                  ks="5,50", samples="0")  # fmt: skip
    assert rc == 0
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    ck = out / ckpt.name
    assert _json(ck / "scores-influence-minres-it2.json")["result"]["iterations"] == 2
    assert _json(ck / "scores-influence-minres-it6.json")["result"]["iterations"] == 6
    rec = _json(ck / "sensitivity-influence-minres.json")
    assert rec["settings"]["ks"] == [5, 40]
    res = rec["result"]
    assert [m["setting"] for m in res["members"]] == [2, 6]
    (pair,) = res["pairs"]
    a = mftx.Scores.load(ck / "scores-influence-minres-it2.safetensors")
    b = mftx.Scores.load(ck / "scores-influence-minres-it6.safetensors")
    layout = FlatIndex.of(a.tensors())
    for k in (5, 40):
        ta, tb = (
            set(_glob(layout, a.candidates(k)).tolist()),
            set(_glob(layout, b.candidates(k)).tolist()),
        )
        assert pair["overlap"][str(k)] == len(ta & tb) / k
    fa = torch.cat([t.reshape(-1).double() for t in a.tensors()])
    fb = torch.cat([t.reshape(-1).double() for t in b.tensors()])
    assert pair["relative_change"] == pytest.approx(float((fb - fa).norm() / fb.norm()), rel=1e-9)
    assert sensitivity.compare(a, a, [5])["overlap"] == {"5": 1.0}
    lanczos = _json(ck / "sensitivity-influence-lanczos.json")["result"]
    assert lanczos["parameter"] == "rank" and [m["setting"] for m in lanczos["members"]] == [2, 3]

    run = load_run(out)
    rows = sensitivity_rows(run)
    assert [r["method"] for r in rows] == ["influence-lanczos-r2", "influence-lanczos-r3",
                                           "influence-minres-it2", "influence-minres-it6"]  # fmt: skip
    assert rows[2]["solve"].startswith("MINRES, 2 it., rel. residual")
    assert rows[2]["next_setting"] == 6 and rows[3]["next"] is None
    assert rows[2]["heldout_gain"] is not None
    table = sensitivity_table(run)
    assert "| 6 it." in table and "rank 3" in table
