"""A run as files: ``results.json`` (everything, readable back) and CSV tables.

``results.json`` holds the run index, each checkpoint's stage records as the
run directory has them, the masking table's best points, the rows of the
held-out sections that have any (``tables``: section key -> rows; derived from
the records, not read back) and what is incomplete;
`mftx.study.report.load.load_results` reads it back, so a report can be rebuilt from
it alone. Paths in it are relative to its own directory. ``results.csv`` holds
every masking sweep point; ``results-<section>.csv`` each held-out section's
rows (lists as JSON text, None as an empty cell).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ... import fileio
from .load import REPORT_FORMAT, Run
from .sections import section_rows
from .tables import CSV_HEADER, MaskingRow, csv_rows, masking_rows

__all__ = ["run_to_dict", "section_csv_name", "write_csv", "write_results_json",
           "write_section_csvs"]  # fmt: skip


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
    doc = {
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
    tables = section_rows(run)
    if tables:
        doc["tables"] = tables
    return doc


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


def section_csv_name(key: str) -> str:
    """File name of a held-out section's CSV: ``results-<key>.csv``."""
    return f"results-{key}.csv"


def _csv_value(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, (list, dict)):
        return json.dumps(x)
    return x


def _write_rows(path: Path, rows: Sequence[Dict[str, Any]]) -> Path:
    header = list(rows[0])
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[_csv_value(r.get(k)) for k in header] for r in rows])
    return fileio.atomic_write(path, buf.getvalue())


def write_section_csvs(run: Run, out_dir: Path) -> List[Path]:
    """``results-<key>.csv`` for each held-out section with rows."""
    return [_write_rows(out_dir / section_csv_name(k), rows)
            for k, rows in section_rows(run).items()]  # fmt: skip
