"""The run machinery: index mapping, record schema, stage reuse rules, sample choice, backends."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mftx
from mftx import fileio
from mftx.backends import backend as backends
from mftx.backends import xla
from mftx.ops.indexing import FlatIndex
from mftx.scores import Scores
from mftx.study import records
from mftx.study.fidelity import choose_samples
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
)
from mftx.study.stages import Stage, StageMismatch, digest_batches, digest_tensors

# --------------------------------------------------------------------------- FlatIndex


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=6), st.data())
def test_flat_index_matches_a_concatenation(numels, data):
    tensors = [torch.arange(n) + 100 * i for i, n in enumerate(numels)]
    flat = torch.cat(tensors)  # entry g of the concatenation is 100 * t + f
    layout = FlatIndex(numels)
    assert layout.total == flat.numel()
    if not layout.total:
        with pytest.raises(IndexError):
            layout.split(0)
        return
    g = torch.tensor(
        data.draw(st.lists(st.integers(0, layout.total - 1), max_size=10)), dtype=torch.int64
    )
    t, f = layout.split(g)
    assert torch.equal(100 * t + f, flat[g])
    assert torch.equal(layout.to_global(t, f), g)
    for gi in g.tolist():
        ti, fi = layout.split(gi)
        assert 100 * ti + fi == int(flat[gi]) and layout.to_global(ti, fi) == gi


def test_flat_index_refuses_out_of_range():
    layout = FlatIndex([3, 0, 2])
    assert layout.split(3) == (2, 0)  # the empty tensor is skipped
    with pytest.raises(IndexError, match=r"global index 5 out of range \[0, 5\)"):
        layout.split(5)
    with pytest.raises(IndexError):
        layout.split(torch.tensor([0, -1]))
    with pytest.raises(IndexError, match="flat index 3 out of range"):
        layout.to_global(0, 3)
    with pytest.raises(IndexError, match="tensor index 3"):
        layout.to_global(3, 0)
    with pytest.raises(TypeError, match="integer"):
        layout.split(torch.tensor([1.0]))


# --------------------------------------------------------------------------- records


def _records():
    base = Baseline(0.6, 0.66, 872)
    sample = FidelitySample("w", 1, 2, 0.5, math.nan, "random", {"taylor": -math.inf})
    return [
        CheckpointInfo("ckpt-60", Path("/x/ckpt-60"), 0.6, base, 10, 4, {"step": 3}, {"seed": 0}),
        ScoresInfo(
            "influence",
            "scores-influence.safetensors",
            "a" * 64,
            1.5,
            "ggn",
            0.01,
            4,
            12,
            3e-7,
            True,
            "tol reached",
            25,
        ),
        Sweep("gradient", base, [SweepPoint(5, 5, 0.61, 0.6, 872)], True),
        Overlap.of_counts(0, 3, 0, analysed_params=10, influence_method="influence"),
        Fidelity(
            "float64",
            3,
            [sample],
            {
                "taylor": FidelityStats(
                    "taylor", *[math.nan] * 3, 1, {"pearson": "non-finite values"}
                )
            },
            0.66,
        ),
    ]


@pytest.mark.parametrize("result", _records(), ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_strict_json(tmp_path, result):
    rec = StageRecord(result.KIND, {"a": {"b": [1, 2]}}, {"weights": "f" * 64}, "partial", result)
    path = tmp_path / "run" / "c" / f"{result.KIND}.json"
    fileio.write_json(path, rec, root=tmp_path / "run")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and '"/x/' not in text
    back = records.read_stage(path, result.KIND, tmp_path / "run")
    assert fileio.dumps(back, tmp_path) == fileio.dumps(rec, tmp_path)
    assert back.format == f"mftx.{result.KIND}/1" and not back.complete


def test_file_names_and_kinds():
    assert records.stem("sweep", "influence-ggn") == "sweep-influence-ggn"
    assert records.stem("fidelity") == "fidelity"
    assert records.kind_of("sweep-influence-ggn") == "sweep"
    assert records.kind_of("fidelity") == "fidelity"
    for other in ("fidelity-x", "sweep", "analysis", "results", "solve-influence"):
        assert records.kind_of(other) is None, other
    with pytest.raises(ValueError, match="per method"):
        records.stem("sweep")

    # Every stage's module registers its kind.
    import mftx.study.analysis
    import mftx.study.report  # noqa: F401

    assert set(records.stage_kinds()) == {
        "checkpoint", "scores", "sweep", "overlap", "fidelity", "split", "heldout", "groupfid",
        "location", "spectrum", "fresh", "splits", "sensitivity",
    }  # fmt: skip
    assert records.kind_of("spectrum-hessian") == "spectrum"
    assert records.kind_of("spectrum") is None  # one record per curvature


def test_run_index_checks_its_fields(tmp_path):
    good = RunIndex({"methods": ["gradient"]}, ["ckpt-60"], ["mftx", "analyze", tmp_path])
    doc = fileio.loads(fileio.dumps(good, tmp_path / "run"), tmp_path / "run")
    assert RunIndex.from_json(doc, "analysis.json").command[2] == str(tmp_path)
    with pytest.raises(fileio.FileFormatError, match="directory names"):
        RunIndex.from_json({**doc, "checkpoints": ["a/b"]}, "analysis.json")


# --------------------------------------------------------------------------- stages


def _stage(tmp_path, **kw):
    args = dict(settings={"score": {"damping": 0.01, "ks": (1, 2)}}, inputs={"weights": "a" * 64})
    args.update(kw)
    return Stage(tmp_path / "c" / "sweep-x.json", "sweep", root=tmp_path, **args)


def test_stage_reuses_only_matching_records(tmp_path):
    result = Sweep("x", None, [SweepPoint(5, 5, 0.5, 0.7)], None)
    assert _stage(tmp_path).previous() is None  # nothing on disk
    _stage(tmp_path).save(result, complete=False)
    prev = _stage(tmp_path).previous()
    assert prev is not None and not prev.complete and prev.result.points[0].k == 5
    assert _stage(tmp_path, force=True).previous() is None

    other = _stage(tmp_path, settings={"score": {"damping": 0.1, "ks": [1, 2]}})
    with pytest.raises(StageMismatch, match=r"score\.damping = 0\.01 on disk, 0\.1 now.*--force"):
        other.previous()
    moved = _stage(tmp_path, inputs={"weights": "b" * 64})
    with pytest.raises(StageMismatch, match=r"input 'weights' differs \(aaaaaaaaaaaa… on disk"):
        moved.previous()
    more = _stage(tmp_path, inputs={"weights": "a" * 64, "scores": "c" * 64})
    with pytest.raises(StageMismatch, match=r"input 'scores' differs \(not recorded"):
        more.previous()


def test_stage_settings_added_later_match_their_default(tmp_path):
    _stage(tmp_path).save(Sweep("x", None, [], None))
    newer = {"score": {"damping": 0.01, "ks": [1, 2], "new_field": 3}}
    with pytest.raises(StageMismatch, match=r"score\.new_field not recorded on disk"):
        _stage(tmp_path, settings=newer).previous()
    assert _stage(tmp_path, settings=newer, defaults={"score.new_field": 3}).previous()
    with pytest.raises(StageMismatch, match=r"score\.new_field = 3 on disk, 4 now"):
        bumped = {"score": {**newer["score"], "new_field": 4}}
        _stage(tmp_path, settings=bumped, defaults={"score.new_field": 3}).previous()


def test_digests_see_every_change():
    a = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([0])}
    b = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([1])}
    assert digest_batches([a, b]) == digest_batches([dict(a), dict(b)])
    assert digest_batches([a, b]) != digest_batches([b, a])
    assert digest_batches([a]) != digest_batches([a, a])
    w = torch.zeros(3)
    assert digest_tensors([("w", w)]) != digest_tensors([("v", w)])
    assert digest_tensors([("w", w)]) != digest_tensors([("w", -w)])  # -0.0: other bits
    assert digest_tensors([("w", w)]) != digest_tensors([("w", w.double())])


# --------------------------------------------------------------------------- fidelity samples


def _scores(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (11,), (3, 4)]
    out = {}
    for m in ("gradient", "influence", "taylor"):
        out[m] = Scores(m, {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)})
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3), st.integers(0, 29), st.integers(0, 29), st.integers(1, 3))
def test_more_samples_keep_every_earlier_one(seed, n1, extra, n_methods):
    scores = dict(list(_scores(seed).items())[:n_methods])
    small = choose_samples(scores, n1)
    large = choose_samples(scores, n1 + extra)
    assert len(small) == n1 and len(large) == n1 + extra
    assert set(small) <= set(large)
    tops = [o for o in large.values() if o != "random"]
    assert len(tops) == (n1 + extra) // 2
    # Each method's share is its own top candidates, first ones first.
    layout = FlatIndex.of(next(iter(scores.values())).tensors())
    first = next(iter(scores))
    c = scores[first].candidates(1)
    if (n1 + extra) // 2:
        best = layout.to_global(int(c.tensor_index[0]), int(c.flat_index[0]))
        assert large[best] == f"top-{first}"


def test_choose_samples_refuses_more_than_there_are():
    scores = _scores(0)
    assert len(choose_samples(scores, 58)) == 58  # every parameter
    with pytest.raises(ValueError, match=r"in \[0, 58\]"):
        choose_samples(scores, 59)


# --------------------------------------------------------------------------- backends


def test_backends_are_looked_up_by_name():
    assert backends.BACKENDS == ("eager", "compile", "xla")
    assert backends.get_backend("compile").hvp_backend(mftx.ScoreConfig()) == "compile"
    xcfg = mftx.ScoreConfig(backend="xla", xla_compile=True)
    assert backends.get_backend("xla").hvp_backend(xcfg) == "openxla"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get_backend("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        mftx.ScoreConfig(backend="tpu").validate()


def test_backend_errors_are_explained_only_when_known():
    engine = RuntimeError("... device_ready_queues_ ... INTERNAL ASSERT FAILED")
    assert "torch_xla.device()" in str(backends.get_backend("xla").explain(engine))
    assert backends.get_backend("xla").explain(RuntimeError("other")) is None
    assert backends.get_backend("eager").explain(engine) is None
    assert xla.explain_error(ValueError("device_ready_queues_")) is None


def test_score_runs_through_the_backend_interface(monkeypatch):
    """score() builds every curvature operator through its backend: a stand-in backend
    registered under 'eager' sees each call, and the results are unchanged."""
    from _toys import mlp_problem

    model, train, val, objective = mlp_problem()
    want = mftx.score(model, train, val, loss_fn=objective, solver="minres", damping=1.0,
                      progress=False)  # fmt: skip
    seen = []

    class Spy(backends.Backend):
        def prepare(self, *args):
            seen.append("prepare")
            return super().prepare(*args)

        def curvature(self, *args, **kwargs):
            seen.append("curvature")
            return super().curvature(*args, **kwargs)

    monkeypatch.setitem(backends._BACKENDS, "eager", Spy())
    got = mftx.score(model, train, val, loss_fn=objective, solver="minres", damping=1.0,
                     progress=False)  # fmt: skip
    assert seen == ["prepare", "curvature", "curvature"]  # val gradient, train HVPs
    for n in want.names:
        assert torch.equal(got.scores[n], want.scores[n])


# ---------------------------------------------------------------- method labels in analyze


def test_method_labels_name_variants_that_reach_the_score_config(tmp_path):
    from mftx.study.config import AnalyzeConfig, Variant, parse_method

    assert parse_method("influence") == Variant("influence")
    assert parse_method("influence-ggn-cg") == Variant("influence", "ggn", "cg")
    assert parse_method("influence-auto-cg") == Variant("influence", solver="cg", damping="auto")
    assert parse_method("taylor-ggn") == Variant("taylor", "ggn")
    cfg = AnalyzeConfig(methods=["influence", "influence-cg-auto", "influence-ggn-cg",
                                 "influence-lanczos"], damping=0.05)  # fmt: skip
    cfg.validate()
    base = cfg.score_config("influence")
    assert (base.solver, base.curvature, base.damping) == ("minres", "hessian", 0.05)
    auto = cfg.score_config("influence-cg-auto")
    assert (auto.solver, auto.curvature, auto.damping) == ("cg", "hessian", "auto")
    ggn = cfg.score_config("influence-ggn-cg")
    assert (ggn.solver, ggn.curvature, ggn.damping) == ("cg", "ggn", 0.05)
    low = cfg.score_config("influence-lanczos", tmp_path)
    assert low.solver == "lanczos"
    assert low.lowrank_file == str(tmp_path / "lowrank-influence-lanczos.safetensors")
    assert cfg.score_config("influence", tmp_path).lowrank_file is None


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("influence-newton", "unknown variant 'newton'"),
        ("influence-cg-minres", "names the solver twice"),
        ("influence-ggn-hessian", "names the curvature twice"),
        ("gradient-cg", "only influence takes a solver"),
        ("taylor-auto", "only influence takes a damping"),
        ("newton", "unknown method"),
    ],
)
def test_method_labels_refuse_what_they_cannot_mean(label, message):
    from mftx.study.config import AnalyzeConfig, parse_method

    with pytest.raises(ValueError, match=message):
        parse_method(label)
    with pytest.raises(ValueError, match=message):
        AnalyzeConfig(methods=["gradient", label]).validate()
