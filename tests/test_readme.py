"""The README's code runs as written: the API tour (on the real MiniLM and SST-2) and
the Trainer example (on a tiny GPT-2 it writes)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MFTX_DATA", ROOT.parent / "shared" / "data" / "sst2"))


def _python_block(heading: str) -> str:
    """The first python code block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not (DATA / "train.tsv").is_file(), reason=f"no SST-2 at {DATA}")
def test_api_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = _python_block("## API tour").replace('"../shared/data/sst2"', repr(str(DATA)))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "'analysed': 10637568" in out
    assert (tmp_path / "scores.safetensors").is_file()
    # The evaluation with 5,000 parameters masked differs from the one after restoring.
    lines = [ln for ln in out.splitlines() if ln.startswith("{'accuracy'")]
    assert len(lines) == 2 and lines[0] != lines[1]


def test_trainer_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = _python_block("### From a Hugging Face Trainer")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == ["['score.weight']", "True 4"]
