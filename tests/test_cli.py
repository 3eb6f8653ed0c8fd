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


METHODS = "gradient,influence,influence-ggn,taylor"


def _analyze(data, finetuned, out, *extra, methods=METHODS, ks="5,50,500", samples="12"):
    return _run(
        "analyze", str(finetuned), "--data", str(data), "--train-size", "32",
        "--batch-size", "8", "--ks", ks, "--methods", methods,
        "--damping", "1.0", "--max-iter", "30", "--fidelity-samples", samples,
        "--out", str(out), *extra,
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
