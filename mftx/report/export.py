"""A run as files: ``results.json`` (everything, readable back) and ``results.csv`` (sweeps).

``results.json`` holds the run index, each checkpoint's stage records as the
run directory has them, the masking table's best points and what is
incomplete; `mftx.report.load.load_results` reads it back, so a report can be
rebuilt from it alone. Paths in it are relative to its own directory.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict

from .. import fileio
from .load import REPORT_FORMAT, Run
from .tables import CSV_HEADER, MaskingRow, csv_rows, masking_rows

__all__ = ["run_to_dict", "write_csv", "write_results_json"]


def _row_dict(row: MaskingRow) -> Dict[str, Any]:
    return {
        "method": row.method,
        "status": row.status,
        "baseline_accuracy": row.baseline_accuracy,
        "best": None if row.best is None else row.best.to_json(),
        "improvement_points": row.improvement,
        "share_percent": row.share,
    }


def run_to_dict(run: Run) -> Dict[str, Any]:
    """Everything in the run as one document, for `mftx.fileio.write_json` (which writes
    paths relative to the file and NaN as null)."""
    best: Dict[str, list] = {}
    for row in masking_rows(run):
        best.setdefault(row.checkpoint, []).append(_row_dict(row))
    return {
        "format": REPORT_FORMAT,
        "run_dir": run.directory,
        "analysis": run.index.to_json(),
        "checkpoints": [
            {
                "name": c.name,
                "records": {stem: c.records[stem].to_json() for stem in sorted(c.records)},
                "masking": best.get(c.name, []),
                "problems": list(c.problems),
            }
            for c in run.checkpoints
        ],
        "problems": list(run.problems),
        "incomplete": run.incomplete(),
    }


def write_results_json(run: Run, path: Path) -> Path:
    """``results.json``: strict JSON, paths relative to its directory."""
    return fileio.write_json(path, run_to_dict(run))


def write_csv(run: Run, path: Path) -> Path:
    """`csv_rows` under `CSV_HEADER`."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    writer.writerows(csv_rows(run))
    return fileio.atomic_write(path, buf.getvalue())
