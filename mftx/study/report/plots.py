"""The report's plots: accuracy against k (one PNG per checkpoint and a combined figure)
and the held-out sections' figures (`mftx.study.report.figures`), each PNG named after its
checkpoint.

matplotlib is optional: without it `write_plots` returns None and the report says so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from ... import fileio
from .figures import FIGURES
from .load import Checkpoint, Run, order_methods
from .names import COMBINED_PLOT, figure_name, plot_name
from .sections import SECTIONS
from .tables import fmt_accuracy

__all__ = ["write_plots"]

logger = logging.getLogger(__name__)


def _draw_checkpoint(ax: Any, ckpt: Checkpoint) -> None:
    """Accuracy (%) against k on a log axis, a line per method, the baseline dashed."""
    drawn = False
    for method in order_methods(ckpt.sweeps):
        pts = [p for p in ckpt.sweeps[method].points if p.k > 0 and not math.isnan(p.accuracy)]
        if pts:
            ax.plot([p.k for p in pts], [100 * p.accuracy for p in pts], marker="o", label=method)
            drawn = True
    base = ckpt.baseline_for(next(iter(order_methods(ckpt.sweeps)), ""))
    if base is not None and not math.isnan(base.accuracy):
        ax.axhline(100 * base.accuracy, linestyle="--", color="black", label="unmasked")
        title = f"{ckpt.name} (baseline {fmt_accuracy(base.accuracy)})"
    else:
        title = f"{ckpt.name} (baseline unknown)"
    if drawn:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no sweep results", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("parameters masked (k)")
    ax.set_ylabel("dev accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _section_figures(run: Run, out_dir: Path, Figure: Any, save: Any) -> List[Path]:
    """The held-out sections' figures (`mftx.study.report.figures`), where the records exist."""
    paths = []
    for section in SECTIONS:
        if not section.plot:
            continue
        for ckpt in run.checkpoints:
            fig = FIGURES[section.key](ckpt, Figure)
            if fig is not None:
                path = out_dir / figure_name(section.key, ckpt.name)
                save(fig, path)
                paths.append(path)
    return paths


def write_plots(run: Run, out_dir: Path) -> Optional[List[Path]]:
    """Write one PNG per checkpoint and a combined figure; None if matplotlib is missing.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global
    backend switch), so it works headless and leaves an interactive session's
    backend alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        logger.warning("matplotlib is not installed (%s): skipping plots", exc)
        return None

    def save(fig: Any, path: Path) -> None:
        FigureCanvasAgg(fig)
        with fileio.atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")

    paths = []
    for ckpt in run.checkpoints:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        _draw_checkpoint(fig.add_subplot(), ckpt)
        path = out_dir / plot_name(ckpt.name)
        save(fig, path)
        paths.append(path)
    paths += _section_figures(run, out_dir, Figure, save)
    if run.checkpoints:
        n = len(run.checkpoints)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
        for i, ckpt in enumerate(run.checkpoints):
            _draw_checkpoint(fig.add_subplot(rows, cols, i + 1), ckpt)
        path = out_dir / COMBINED_PLOT
        save(fig, path)
        paths.append(path)
    return paths
