"""Reports of an analysis run: tables, CSV/JSON of everything, and plots.

`mftx analyze --out RUN_DIR` writes the run's records (see `mftx.study.records`);
the report reads them (`load`), renders the tables (`tables`, and the held-out
sections declared in `sections`: `heldout_tables`, `seeds`, `groupfid_tables`,
`benchmark`, `location_tables`, `spectrum_tables`, from the numbers of
`summaries`), exports ``results.json``, ``results.csv`` and one
``results-<section>.csv`` per held-out section (`export`), draws the plots
(`plots`, `figures`) and writes ``report.md`` (`markdown`). `write_report` does
all of it, from a run directory or from a ``results.json`` written earlier (the
report rebuilt without the run directory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from ... import fileio
from ...fileio import FileFormatError
from .export import run_to_dict, write_csv, write_results_json, write_section_csvs
from .load import METHOD_ORDER, REPORT_FORMAT, Checkpoint, Run, load_results, load_run
from .markdown import format_tables, render_markdown
from .names import COMBINED_PLOT, plot_name
from .plots import write_plots

__all__ = [
    "COMBINED_PLOT",
    "METHOD_ORDER",
    "REPORT_FORMAT",
    "Checkpoint",
    "Run",
    "RunFormatError",
    "format_tables",
    "load",
    "load_results",
    "load_run",
    "plot_name",
    "render_markdown",
    "run_to_dict",
    "write_csv",
    "write_plots",
    "write_report",
    "write_section_csvs",
]

logger = logging.getLogger(__name__)

#: A run file that exists but cannot be read (names the file): `mftx.fileio.FileFormatError`.
RunFormatError = FileFormatError

PathLike = Union[str, Path]


def load(source: PathLike) -> Run:
    """A run from its directory or from a ``results.json`` file."""
    source = Path(source)
    return load_results(source) if source.is_file() else load_run(source)


def write_report(source: Union[PathLike, Run], out_dir: Optional[PathLike] = None) -> Path:
    """Write report.md, results.csv, results.json and PNG plots; return the report directory.

    `source`: a run directory, a ``results.json`` or a loaded `Run`. ``out_dir``
    defaults to ``RUN_DIR/report`` (for a ``results.json``: its directory).
    Raises like `load_run`.
    """
    if isinstance(source, Run):
        run, default = source, None
    else:
        run = load(source)
        path = Path(source)
        default = path.parent if path.is_file() else path / "report"
    if out_dir is None and default is None:
        raise ValueError("write_report of a loaded Run needs out_dir")
    out = Path(out_dir) if out_dir is not None else default
    out.mkdir(parents=True, exist_ok=True)
    write_csv(run, out / "results.csv")
    write_section_csvs(run, out)
    write_results_json(run, out / "results.json")
    plots = write_plots(run, out)
    fileio.atomic_write(out / "report.md", render_markdown(run, plots, out))
    logger.info("report written to %s", out)
    return out
