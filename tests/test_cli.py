"""End to end through the `mftx` command: finetune -> analyze -> report, on a tiny BERT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _toys import TOY_WORDS, toy_sst2
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mftx
from mftx import masking
from mftx.cli import main
from mftx.models import make_tiny_bert


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = toy_sst2(root / "sst2")
    model = make_tiny_bert(root / "tiny", TOY_WORDS, hidden_size=16, intermediate=32)
    return root, data, model


def _run(*args: str) -> int:
    return main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def finetuned(workspace):
    root, data, model = workspace
    out = root / "ft"
    rc = _run(
        "finetune", "--model", str(model), "--data", str(data), "--train-size", "32",
        "--batch-size", "8", "--lr", "1e-3", "--epochs", "2", "--eval-every", "2",
        "--targets", "0.3,0.995", "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    return out


def test_finetune_saves_reached_targets_and_says_which_were_not(finetuned, capsys):
    summary = json.loads((finetuned / "finetune.json").read_text())
    assert summary["complete"] and summary["targets"]["0.30"]["reached"]
    assert summary["unreached"] == ["0.99"] or not summary["targets"]["0.99"]["reached"]
    ckpt = finetuned / summary["targets"]["0.30"]["checkpoint"]
    meta = json.loads((ckpt / "mftx.json").read_text())
    assert meta["accuracy"] >= 0.3 and meta["seed"] == 0 and meta["data"]["train_rows"] == 32
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(ckpt)  # loads as a normal HF checkpoint
    # A second call reuses the finished run and states the targets plainly.
    assert _run("finetune", "--model", "x", "--data", "x", "--out", str(finetuned)) == 0
    assert "NOT reached" in capsys.readouterr().out


METHODS = "gradient,influence,influence-ggn,taylor"


def _analyze(data, finetuned, out, *extra, methods=METHODS, ks="5,50,500", samples="12"):
    return _run(
        "analyze", str(finetuned), "--data", str(data), "--train-size", "32",
        "--batch-size", "8", "--ks", ks, "--methods", methods,
        "--damping", "1.0", "--max-iter", "30", "--fidelity-samples", samples,
        "--spectrum-steps", "6", "--spectrum-probes", "2", "--out", str(out), *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def analyzed(workspace, finetuned):
    """One complete analysis of the reached checkpoint; tests work on copies of it."""
    root, data, _ = workspace
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    weights = {k: v.clone() for k, v in load_file(ckpt / "model.safetensors").items()}
    out = root / "an"
    assert _analyze(data, finetuned, out) == 0
    return out, ckpt, weights


def _json(path):
    return json.loads(path.read_text())


def test_analyze_writes_every_stage_and_the_report(workspace, finetuned, analyzed, capsys):
    out, ckpt, weights_before = analyzed
    ck = out / ckpt.name
    for f in ("checkpoint.json", "fidelity.json", "scores-influence.safetensors",
              "sweep-gradient.json", "sweep-influence.json", "sweep-taylor.json",
              "scores-influence-ggn.safetensors", "sweep-influence-ggn.json",
              "scores-influence.json", "scores-gradient.json", "overlap-influence.json",
              "overlap-influence-ggn.json"):  # fmt: skip
        assert (ck / f).is_file(), f
    for f in ck.glob("*.json"):
        rec = _json(f)
        assert rec["format"].startswith("mftx.") and rec["state"] == "complete", f
        assert rec["inputs"] and all(len(v) == 64 for v in rec["inputs"].values()), f
    sweep = _json(ck / "sweep-influence.json")["result"]
    assert [p["k"] for p in sweep["points"]] == [5, 50, 500] and sweep["restored_bitwise"]
    overlap = _json(ck / "overlap-influence.json")["result"]
    G, B, both = overlap["gradient_flagged"], overlap["influence_beneficial"], overlap["both"]
    assert 0 <= both <= min(G, B) and overlap["false_positive_rate"] == pytest.approx(
        (G - both) / G
    )
    fid = _json(ck / "fidelity.json")["result"]
    assert len(fid["samples"]) == 12
    assert set(fid["summary"]) == {"gradient", "influence", "influence-ggn", "taylor"}

    # The checkpoint on disk is untouched by the analysis.
    after = load_file(ckpt / "model.safetensors")
    assert all(
        torch.equal(after[k].view(torch.int32), v.view(torch.int32))
        for k, v in weights_before.items()
    )

    assert _run("report", str(out)) == 0
    rep = out / "report"
    md = (rep / "report.md").read_text()
    assert "mftx analyze" in md and ckpt.name in md
    solve = _json(ck / "scores-influence-ggn.json")["result"]
    assert solve["curvature"] == "ggn" and solve["iterations"] >= 1
    assert "## Inverse-HVP solves" in md and "| influence-ggn | ggn |" in md
    assert (rep / "results.csv").read_text().count("\n") == 1 + 4 * 3
    ggn = mftx.Scores.load(ck / "scores-influence-ggn.safetensors")
    assert ggn.method == "influence" and ggn.config["curvature"] == "ggn"
    assert overlap["influence_method"] == "influence"
    # The overlap against the GGN variant, computed from its own scores.
    ov_ggn = _json(ck / "overlap-influence-ggn.json")["result"]
    assert ov_ggn["influence_method"] == "influence-ggn"
    gflag = mftx.Scores.load(ck / "scores-gradient.safetensors").flagged()
    assert ov_ggn["gradient_flagged"] == G == len(gflag)
    assert ov_ggn["influence_beneficial"] == len(ggn.flagged())
    assert "## Overlap of gradient-flagged" in md and f"| {ckpt.name} | influence-ggn |" in md
    assert (rep / f"accuracy-{ckpt.name}.png").read_bytes()[:4] == b"\x89PNG"
    # One spectrum per curvature the influence methods use, in the report with its density.
    for curvature in ("hessian", "ggn"):
        spec = mftx.Spectrum.from_json(_json(ck / f"spectrum-{curvature}.json")["result"])
        assert spec.info["curvature"] == curvature and len(spec.nodes) == 2
        assert spec.lambda_min <= spec.lambda_max and spec.n == ggn.numel
    assert "## Curvature spectrum" in md and f"| {ckpt.name} | ggn |" in md
    assert (rep / f"spectrum-{ckpt.name}.png").read_bytes()[:4] == b"\x89PNG"
    # The report rebuilds from its results.json alone, to the same files.
    again = out / "again"
    assert _run("report", str(rep / "results.json"), "--out", str(again)) == 0
    for name in ("results.json", "results.csv", "report.md"):
        assert (again / name).read_text() == (rep / name).read_text(), name


def test_outputs_hold_no_absolute_path(workspace, finetuned, analyzed):
    """Every file finetune, analyze and report wrote (logs included) is free of the
    machine's paths: they are relative to the run, report or checkpoint directory."""
    root, _, _ = workspace
    out, _, _ = analyzed
    assert _run("report", str(out)) == 0
    checked = 0
    for directory in (finetuned, out):
        for f in directory.rglob("*"):
            if f.is_file() and f.suffix != ".png":
                data = f.read_bytes()
                if f.suffix == ".safetensors":  # the JSON header
                    data = data[8 : 8 + int.from_bytes(data[:8], "little")]
                assert str(root).encode() not in data, f
                assert b"/tmp/" not in data, f
                checked += 1
    assert checked > 20
    cmd = _json(out / "analysis.json")["command"]
    assert cmd[:3] == ["mftx", "analyze", "../ft"] and cmd[cmd.index("--out") + 1] == "."


# ---------------------------------------------------------------- resuming


@pytest.fixture
def calls(monkeypatch):
    """Counts of the expensive steps of `analyze`: scoring, evaluations, zeroings."""
    import mftx.study.analysis as analysis
    import mftx.study.fidelity as fidelity

    counts = {"score": [], "evaluate": 0, "delta": 0}
    real_score, real_eval = analysis.score_with_config, analysis.evaluate
    real_delta = fidelity.ZeroingEvaluator.delta

    def score(model, train, val, cfg, **kw):
        counts["score"].append(cfg.method if cfg.curvature == "hessian" else "influence-ggn")
        return real_score(model, train, val, cfg, **kw)

    def evaluate(*args):
        counts["evaluate"] += 1
        return real_eval(*args)

    def delta(self, t, f):
        counts["delta"] += 1
        return real_delta(self, t, f)

    monkeypatch.setattr(analysis, "score_with_config", score)
    monkeypatch.setattr(analysis, "evaluate", evaluate)
    monkeypatch.setattr(fidelity.ZeroingEvaluator, "delta", delta)
    return counts


def _copy(analyzed, tmp_path):
    out = tmp_path / "an"
    shutil.copytree(analyzed[0], out)
    return out, out / analyzed[1].name


def _files(ck):
    """File name -> (inode, mtime): an atomic rewrite changes the inode."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in ck.iterdir()}


def _results(path):
    return _json(path)["result"]


def test_rerun_reuses_every_stage(workspace, finetuned, analyzed, tmp_path, calls):
    out, ck = _copy(analyzed, tmp_path)
    before = _files(ck)
    assert _analyze(workspace[1], finetuned, out) == 0
    assert calls == {"score": [], "evaluate": 0, "delta": 0}
    assert _files(ck) == before


def test_added_method_computes_only_its_stages(workspace, finetuned, tmp_path, calls):
    from mftx.study.fidelity import choose_samples

    data = workspace[1]
    out = tmp_path / "an"
    assert _analyze(data, finetuned, out, methods="gradient,influence", ks="5,50") == 0
    ck = next(p for p in out.iterdir() if p.is_dir())
    before = _files(ck)
    old_keys = {
        (s["tensor_index"], s["flat_index"]) for s in _results(ck / "fidelity.json")["samples"]
    }
    calls.update(score=[], evaluate=0, delta=0)
    assert _analyze(data, finetuned, out, methods="gradient,influence,taylor", ks="5,50") == 0
    assert calls["score"] == ["taylor"] and calls["evaluate"] == 2  # its sweep, nothing else
    after = _files(ck)
    changed = {f for f in after if before.get(f) != after[f]}
    assert changed == {"scores-taylor.json", "scores-taylor.safetensors", "sweep-taylor.json",
                       "location-taylor.json", "fidelity.json"}  # fmt: skip
    fid = _results(ck / "fidelity.json")
    keys = {(s["tensor_index"], s["flat_index"]) for s in fid["samples"]}
    assert calls["delta"] == len(keys - old_keys) <= 2  # taylor's share of the top half
    assert set(fid["summary"]) == {"gradient", "influence", "taylor"}
    # The same samples a fresh run would choose.
    scores = {
        m: mftx.Scores.load(ck / f"scores-{m}.safetensors")
        for m in ("gradient", "influence", "taylor")
    }
    from mftx.ops.indexing import FlatIndex

    layout = FlatIndex.of(scores["gradient"].tensors())
    fresh = {layout.split(g) for g in choose_samples(scores, 12)}
    assert keys == fresh


def test_new_k_evaluates_only_that_point(workspace, finetuned, analyzed, tmp_path, calls):
    out, ck = _copy(analyzed, tmp_path)
    old = _results(ck / "sweep-influence.json")["points"]
    assert _analyze(workspace[1], finetuned, out, ks="5,20,50,500") == 0
    assert calls == {"score": [], "evaluate": 4, "delta": 0}  # one point per method
    new = _results(ck / "sweep-influence.json")["points"]
    assert [p["k"] for p in new] == [5, 20, 50, 500]
    assert [p for p in new if p["k"] != 20] == old


def test_more_fidelity_samples_measure_only_the_new_ones(
    workspace, finetuned, analyzed, tmp_path, calls
):
    out, ck = _copy(analyzed, tmp_path)
    old = {
        (s["tensor_index"], s["flat_index"]): s["actual"]
        for s in _results(ck / "fidelity.json")["samples"]
    }
    assert _analyze(workspace[1], finetuned, out, samples="16") == 0
    assert calls == {"score": [], "evaluate": 0, "delta": 4}
    new = {
        (s["tensor_index"], s["flat_index"]): s["actual"]
        for s in _results(ck / "fidelity.json")["samples"]
    }
    assert len(new) == 16 and {k: new[k] for k in old} == old


def _interrupt_after(monkeypatch, owner, name, n):
    real = getattr(owner, name)
    count = [0]

    def wrapped(*args):
        if count[0] == n:
            raise KeyboardInterrupt
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(owner, name, wrapped)


def test_interrupted_fidelity_resumes(workspace, finetuned, analyzed, tmp_path, monkeypatch):
    import mftx.study.fidelity as fidelity

    out, ck = _copy(analyzed, tmp_path)
    full = _results(ck / "fidelity.json")
    (ck / "fidelity.json").unlink()
    with monkeypatch.context() as m:
        _interrupt_after(m, fidelity.ZeroingEvaluator, "delta", 5)
        assert _analyze(workspace[1], finetuned, out) == 130
    partial = _json(ck / "fidelity.json")
    assert partial["state"] == "partial" and len(partial["result"]["samples"]) == 5
    counts = {"n": 0}
    real = fidelity.ZeroingEvaluator.delta
    monkeypatch.setattr(
        fidelity.ZeroingEvaluator, "delta",
        lambda self, t, f: counts.__setitem__("n", counts["n"] + 1) or real(self, t, f),
    )  # fmt: skip
    assert _analyze(workspace[1], finetuned, out) == 0
    assert counts["n"] == 7
    assert _results(ck / "fidelity.json") == full


def test_interrupted_sweep_resumes(workspace, finetuned, analyzed, tmp_path, monkeypatch, calls):
    import mftx.study.analysis as analysis

    out, ck = _copy(analyzed, tmp_path)
    full = _results(ck / "sweep-taylor.json")
    (ck / "sweep-taylor.json").unlink()
    with monkeypatch.context() as m:
        _interrupt_after(m, analysis, "evaluate", 1)
        assert _analyze(workspace[1], finetuned, out) == 130
    partial = _json(ck / "sweep-taylor.json")
    assert partial["state"] == "partial" and [p["k"] for p in partial["result"]["points"]] == [5]
    calls.update(evaluate=0)
    assert _analyze(workspace[1], finetuned, out) == 0
    assert calls == {"score": [], "evaluate": 2, "delta": 0}
    assert _results(ck / "sweep-taylor.json") == full


def test_other_settings_are_refused_naming_them(
    workspace, finetuned, analyzed, tmp_path, capsys, calls
):
    out, ck = _copy(analyzed, tmp_path)
    before, index = _files(ck), (out / "analysis.json").read_text()
    assert _analyze(workspace[1], finetuned, out, "--damping", "2.0") == 1
    err = capsys.readouterr().err
    assert "damping = 1.0 on disk, 2.0 now" in err and "--force" in err
    assert "scores-gradient.json" in err  # the first stage that uses it
    assert calls == {"score": [], "evaluate": 0, "delta": 0} and _files(ck) == before
    assert (out / "analysis.json").read_text() == index  # still describes the records
    # Other data for the same checkpoint name: refused, naming the input.
    assert _run("analyze", str(finetuned), "--data", str(workspace[1]), "--train-size", "24",
                "--methods", "gradient", "--out", str(out)) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "train_size = 32 on disk, 24 now" in err and "input 'train' differs" in err


def test_force_recomputes_everything(workspace, finetuned, analyzed, tmp_path, calls):
    out, ck = _copy(analyzed, tmp_path)
    before = _files(ck)
    assert _analyze(workspace[1], finetuned, out, "--damping", "2.0", "--force") == 0
    assert sorted(calls["score"]) == sorted(METHODS.split(","))
    assert calls["evaluate"] == 1 + 4 * 3 and calls["delta"] == 12
    after = _files(ck)
    assert all(after[f] != before[f] for f in before)
    assert _json(ck / "scores-influence.json")["settings"]["score"]["damping"] == 2.0


def test_sweep_leaves_weights_bitwise_unchanged(workspace, finetuned):
    from mftx import score, select_params
    from mftx.data import load_sst2
    from mftx.evaluate import evaluate
    from mftx.models import load_classifier

    root, data, _ = workspace
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    model, tok = load_classifier(str(ckpt))
    space = select_params(model)
    d = load_sst2(data, 32, 0, tokenizer=tok)
    dev = d.dev_batches(8)
    before = masking.fingerprint(list(model.state_dict().values()))
    s = score(model, d.train_batches(8), dev, method="gradient", progress=False)
    pts = masking.sweep(space, s.candidates(1000), [10, 100, 1000], lambda: evaluate(model, dev),
                        progress=False)  # fmt: skip
    assert len(pts) == 3
    assert masking.fingerprint(list(model.state_dict().values())) == before


def test_unknown_method_variant_is_refused(tmp_path, capsys):
    rc = _run(
        "analyze", str(tmp_path), "--methods", "influence-fisher", "--out", str(tmp_path / "o")
    )
    assert rc == 1 and "unknown variant 'fisher'" in capsys.readouterr().err


def test_analyze_solver_options(tmp_path, capsys):
    from mftx.cli import _analyze_config, build_parser

    args = build_parser().parse_args(
        ["analyze", str(tmp_path), "--damping", "auto", "--solver", "lanczos", "--rank", "7",
         "--out", str(tmp_path / "o")]
    )  # fmt: skip
    cfg = _analyze_config(args)
    scfg = cfg.score_config("influence-ggn")
    assert (scfg.damping, scfg.solver, scfg.rank, scfg.curvature) == ("auto", "lanczos", 7, "ggn")
    assert scfg.lowrank_file is None  # kept with a run only when its directory is known
    kept = cfg.score_config("influence-ggn", tmp_path / "ckpt-60").lowrank_file
    assert kept == str(tmp_path / "ckpt-60" / "lowrank-influence-ggn.safetensors")
    args = build_parser().parse_args(["analyze", str(tmp_path), "--damping", "0.5", "--solver",
                                      "ekfac", "--fisher", "empirical", "--out", "o"])  # fmt: skip
    scfg = _analyze_config(args).score_config("influence")
    assert (scfg.damping, scfg.solver, scfg.fisher) == (0.5, "ekfac", "empirical")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "x", "--damping", "big", "--out", "o"])
    assert "expected a number or 'auto'" in capsys.readouterr().err
    rc = _run("analyze", str(tmp_path), "--damping", "-1", "--out", str(tmp_path / "o"))
    assert rc == 1 and "damping must be finite and >= 0" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = _run("analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "no checkpoint at" in err
    rc = _run("report", str(tmp_path / "nothing"))
    assert rc == 1 and "mftx analyze" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "mftx.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("finetune", "analyze", "report", "demo", "selfcheck"):
        assert cmd in r.stdout


def test_data_error_names_the_file(workspace, tmp_path, capsys):
    root, data, model = workspace
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\nfine film \t7\n")
    (bad / "dev.tsv").write_text((data / "dev.tsv").read_text())
    rc = _run("finetune", "--model", str(model), "--data", str(bad), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1 and "train.tsv" in err and "line 2" in err


def test_method_labels_run_their_variants_side_by_side(workspace, finetuned, tmp_path):
    """One analyze run scores influence through several solvers and dampings by label."""
    methods = "gradient,influence-cg-auto,influence-lanczos,influence-ggn-cg"
    out = tmp_path / "an"
    assert _analyze(workspace[1], finetuned, out, "--rank", "4", methods=methods, ks="5",
                    samples="0") == 0  # fmt: skip
    ck = next(p for p in out.iterdir() if p.is_dir())
    want = {
        "influence-cg-auto": ("cg", "hessian"), "influence-lanczos": ("lanczos", "hessian"),
        "influence-ggn-cg": ("cg", "ggn"),
    }  # fmt: skip
    for label, (solver, curvature) in want.items():
        s = mftx.Scores.load(ck / f"scores-{label}.safetensors")
        assert (s.config["solver"], s.config["curvature"]) == (solver, curvature), label
        assert torch.isfinite(torch.cat([t.reshape(-1) for t in s.tensors()])).all()
        assert (ck / f"overlap-{label}.json").is_file()
    auto = mftx.Scores.load(ck / "scores-influence-cg-auto.safetensors")
    lam, spec = auto.stats["damping"], auto.stats["spectrum"]
    assert auto.config["damping"] == "auto" and lam != 1.0  # chosen, not the run's --damping
    assert lam == pytest.approx(mftx.Spectrum.from_json(spec).auto_damping())
    assert lam + spec["lambda_min"] > 0  # H + λI positive definite
    assert mftx.Scores.load(ck / "scores-influence-ggn-cg.safetensors").stats["damping"] == 1.0
    assert (ck / "lowrank-influence-lanczos.safetensors").is_file()
    # One spectrum per curvature in use.
    assert {f.name for f in ck.glob("spectrum-*.json")} == {"spectrum-hessian.json",
                                                            "spectrum-ggn.json"}  # fmt: skip
