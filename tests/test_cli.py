"""End to end through the `mftx` command: finetune -> analyze -> report, on a tiny BERT."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mftx
from mftx import masking
from mftx.cli import main
from mftx.models import make_tiny_bert

POS = ["good", "great", "fine", "lovely", "superb", "warm", "funny"]
NEG = ["bad", "awful", "dull", "boring", "weak", "cold", "flat"]
FILL = ["the", "film", "is", "a", "movie", "and", "story", "very", "it", "was"]


def _sentences(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [*rng.sample(FILL, 4), rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words) + " ", label))
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "sst2"
    data.mkdir()
    for name, rows in (("train.tsv", _sentences(48, 0)), ("dev.tsv", _sentences(24, 1))):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in rows]
        (data / name).write_text("\n".join(lines) + "\n")
    model = make_tiny_bert(root / "tiny", POS + NEG + FILL, hidden_size=16, intermediate=32)
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


def _analyze(root, data, finetuned, out, *extra):
    return _run(
        "analyze", str(finetuned), "--data", str(data), "--train-size", "32",
        "--batch-size", "8", "--ks", "5,50,500", "--methods", "gradient,influence,influence-ggn,taylor",
        "--damping", "1.0", "--max-iter", "30", "--fidelity-samples", "12",
        "--out", str(out), *extra,
    )  # fmt: skip


def test_analyze_report_and_resume(workspace, finetuned, capsys, tmp_path):
    root, data, _ = workspace
    ckpt = next(p for p in finetuned.iterdir() if (p / "mftx.json").is_file())
    weights_before = {k: v.clone() for k, v in load_file(ckpt / "model.safetensors").items()}
    out = root / "an"
    assert _analyze(root, data, finetuned, out) == 0
    printed = capsys.readouterr().out
    assert "false-positive rate" in printed and "Spearman" in printed

    ck = out / ckpt.name
    for f in ("checkpoint.json", "overlap.json", "fidelity.json", "scores-influence.safetensors",
              "sweep-gradient.json", "sweep-influence.json", "sweep-taylor.json",
              "scores-influence-ggn.safetensors", "sweep-influence-ggn.json",
              "solve-influence.json", "solve-gradient.json"):  # fmt: skip
        assert (ck / f).is_file(), f
    sweep = json.loads((ck / "sweep-influence.json").read_text())
    assert [p["k"] for p in sweep["points"]] == [5, 50, 500] and sweep["restored_bitwise"]
    overlap = json.loads((ck / "overlap.json").read_text())
    G, B, both = overlap["gradient_flagged"], overlap["influence_beneficial"], overlap["both"]
    assert 0 <= both <= min(G, B) and overlap["false_positive_rate"] == pytest.approx(
        (G - both) / G
    )
    fid = json.loads((ck / "fidelity.json").read_text())
    assert len(fid["samples"]) == 12 and set(fid["summary"]) == {
        "gradient",
        "influence",
        "influence-ggn",
        "taylor",
    }

    # The checkpoint on disk is untouched by the analysis.
    after = load_file(ckpt / "model.safetensors")
    assert all(
        torch.equal(after[k].view(torch.int32), v.view(torch.int32))
        for k, v in weights_before.items()
    )

    # Interrupt: drop the last sweep point and half the fidelity samples, then resume.
    full_sweep = json.loads((ck / "sweep-influence.json").read_text())
    cut = dict(full_sweep, points=full_sweep["points"][:1])
    (ck / "sweep-influence.json").write_text(json.dumps(cut))
    full_fid = json.loads((ck / "fidelity.json").read_text())
    (ck / "fidelity.json").write_text(
        json.dumps({"n_samples": 12, "samples": full_fid["samples"][:6], "summary": None})
    )
    mtime = (ck / "scores-influence.safetensors").stat().st_mtime_ns
    assert _analyze(root, data, finetuned, out) == 0
    assert (ck / "scores-influence.safetensors").stat().st_mtime_ns == mtime  # not recomputed
    assert json.loads((ck / "sweep-influence.json").read_text()) == full_sweep
    resumed = json.loads((ck / "fidelity.json").read_text())
    assert resumed["samples"] == full_fid["samples"] and resumed["summary"] == full_fid["summary"]

    # Different settings do not silently reuse scores.
    assert _analyze(root, data, finetuned, out, "--damping", "2.0") == 1
    assert "rerun with --force" in capsys.readouterr().err

    assert _run("report", str(out)) == 0
    rep = out / "report"
    md = (rep / "report.md").read_text()
    assert "mftx analyze" in md and ckpt.name in md
    solve = json.loads((ck / "solve-influence-ggn.json").read_text())
    assert solve["curvature"] == "ggn" and solve["iterations"] >= 1
    assert "## Inverse-HVP solves" in md and "| influence-ggn | ggn |" in md
    assert (rep / "results.csv").read_text().count("\n") == 1 + 4 * 3
    ggn = mftx.Scores.load(ck / "scores-influence-ggn.safetensors")
    assert ggn.method == "influence" and ggn.config["curvature"] == "ggn"
    assert overlap["influence_method"] == "influence"
    # The overlap against the GGN variant, computed from its own scores.
    ov_ggn = json.loads((ck / "overlap-influence-ggn.json").read_text())
    assert ov_ggn["influence_method"] == "influence-ggn"
    gflag = mftx.Scores.load(ck / "scores-gradient.safetensors").flagged()
    assert ov_ggn["gradient_flagged"] == G == len(gflag)
    assert ov_ggn["influence_beneficial"] == len(ggn.flagged())
    assert "## Overlap of gradient-flagged" in md and f"| {ckpt.name} | influence-ggn |" in md
    assert (rep / f"accuracy-{ckpt.name}.png").read_bytes()[:4] == b"\x89PNG"


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
