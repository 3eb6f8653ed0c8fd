"""The README's API tour runs as written (on the real MiniLM and SST-2)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MFTX_DATA", ROOT.parent / "shared" / "data" / "sst2"))


def _api_tour() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## API tour", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not (DATA / "train.tsv").is_file(), reason=f"no SST-2 at {DATA}")
def test_api_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = _api_tour().replace('"../shared/data/sst2"', repr(str(DATA)))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "'analysed': 10637568" in out
    assert (tmp_path / "scores.safetensors").is_file()
    # The evaluation with 5,000 parameters masked differs from the one after restoring.
    lines = [ln for ln in out.splitlines() if ln.startswith("{'accuracy'")]
    assert len(lines) == 2 and lines[0] != lines[1]
