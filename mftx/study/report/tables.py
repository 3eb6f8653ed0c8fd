"""Tables of a run: markdown (masking, overlap, fidelity, solves), number formats, CSV rows.

The held-out sections' tables are in their own modules (see `mftx.study.report.sections`).

Every table takes a `Run` (see `mftx.study.report.load`) and returns markdown text;
missing results show as ``(missing)`` rows, undefined numbers as ``n/a``.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from ... import fileio
from ..records import Overlap, SweepPoint
from .load import Run, order_methods

__all__ = [
    "CSV_HEADER",
    "MaskingRow",
    "command_text",
    "csv_rows",
    "fidelity_table",
    "fmt_accuracy",
    "fmt_corr",
    "fmt_count",
    "fmt_points",
    "fmt_rate",
    "fmt_share",
    "markdown_table",
    "masking_rows",
    "masking_table",
    "overlap_table",
    "overlap_variants_table",
    "solve_table",
]

NA = "n/a"
MISSING = "—"


@dataclass(frozen=True)
class MaskingRow:
    """One row of the masking table (``best`` None: no sweep, or no usable point)."""

    checkpoint: str
    method: str
    baseline_accuracy: Optional[float]
    best: Optional[SweepPoint]
    total_params: Optional[int]
    status: str = "ok"

    @property
    def improvement(self) -> Optional[float]:
        """Best minus baseline accuracy, in accuracy points (percentage points)."""
        if self.best is None or self.baseline_accuracy is None:
            return None
        return 100.0 * (self.best.accuracy - self.baseline_accuracy)

    @property
    def share(self) -> Optional[float]:
        """Parameters removed at the best point as a percentage of the whole model."""
        if self.best is None or not self.total_params:
            return None
        return 100.0 * self.best.removed / self.total_params


def masking_rows(run: Run) -> List[MaskingRow]:
    """One row per checkpoint and method (influence first), including missing sweeps."""
    rows = []
    for ckpt in run.checkpoints:
        for method in ckpt.methods():
            sweep = ckpt.sweeps.get(method)
            base = ckpt.baseline_for(method)
            best = sweep.best() if sweep is not None else None
            if sweep is None:
                status = "missing"
            elif best is None:
                status = "no points"
            else:
                status = "ok"
            rows.append(
                MaskingRow(
                    checkpoint=ckpt.name,
                    method=method,
                    baseline_accuracy=None if base is None else base.accuracy,
                    best=best,
                    total_params=ckpt.total_params,
                    status=status,
                )
            )
    return rows


def _or_na(fmt: Callable[[Any], str]) -> Callable[[Any], str]:
    """`fmt`, with None and NaN shown as ``n/a``."""

    @functools.wraps(fmt)
    def wrapped(x: Any) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return NA
        return fmt(x)

    return wrapped


@_or_na
def fmt_accuracy(x: float) -> str:
    """A fraction as a percentage with one decimal: 0.6044 → ``60.4 %`` (accuracies, rates)."""
    return f"{100.0 * x:.1f} %"


fmt_rate = fmt_accuracy


@_or_na
def fmt_points(x: float) -> str:
    """A signed difference in accuracy points with two decimals: ``+1.15``, ``-0.23``."""
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


@_or_na
def fmt_share(x: float) -> str:
    """A small percentage with at least four decimals and three significant digits."""
    if x == 0.0:
        return "0.0000 %"
    decimals = max(4, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f} %"


@_or_na
def fmt_count(n: int) -> str:
    """An integer with thousands separators: 22713986 → ``22,713,986``."""
    return f"{n:,}"


@_or_na
def fmt_corr(x: float) -> str:
    """A correlation with three decimals."""
    return f"{x:.3f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A GitHub markdown table; the first ``left`` columns left-aligned, the rest right."""
    align = [":--" if i < left else "--:" for i in range(len(headers))]
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


MASKING_HEADERS = (
    "checkpoint",
    "method",
    "baseline accuracy",
    "optimal removal (k)",
    "best accuracy",
    "improvement (points)",
    "parameters removed",
    "share of model",
)


def _masking_cells(row: MaskingRow) -> List[str]:
    if row.best is None:
        note = f"({row.status})"
        return [row.checkpoint, row.method, fmt_accuracy(row.baseline_accuracy), note]
    return [
        row.checkpoint,
        row.method,
        fmt_accuracy(row.baseline_accuracy),
        fmt_count(row.best.k),
        fmt_accuracy(row.best.accuracy),
        fmt_points(row.improvement),
        fmt_count(row.best.removed),
        fmt_share(row.share),
    ]


def masking_table(run: Run) -> str:
    """Markdown masking table: the best sweep point of each checkpoint and method."""
    rows = []
    for row in masking_rows(run):
        cells = _masking_cells(row)
        rows.append(cells + [MISSING] * (len(MASKING_HEADERS) - len(cells)))
    return markdown_table(MASKING_HEADERS, rows, left=2)


OVERLAP_HEADERS = (
    "checkpoint",
    "gradient detrimental (G)",
    "influence beneficial (B)",
    "both",
    "share of G not in B",
    "the same by chance",
    "Cohen's κ",
)


def overlap_table(run: Run) -> str:
    """Markdown overlap table; the rate is ``n/a`` when G is 0, chance and κ without n."""
    rows = []
    for ckpt in run.checkpoints:
        o = ckpt.overlap
        if o is None:
            rows.append([ckpt.name, "(missing)", *[MISSING] * (len(OVERLAP_HEADERS) - 2)])
            continue
        rows.append([ckpt.name, *_overlap_cells(o)])
    return markdown_table(OVERLAP_HEADERS, rows)


def _overlap_cells(o: Overlap) -> List[str]:
    """G, B, both, |G \\ B| / |G| (``n/a`` when G is 0), its chance level and Cohen's κ."""
    fpr = o.false_positive_rate if o.gradient_flagged > 0 else None
    return [
        fmt_count(o.gradient_flagged),
        fmt_count(o.influence_beneficial),
        fmt_count(o.both),
        fmt_rate(fpr),
        fmt_rate(o.chance_rate),
        fmt_corr(o.kappa),
    ]


OVERLAP_VARIANT_HEADERS = (
    "checkpoint",
    "influence method",
    "gradient detrimental (G)",
    "influence beneficial (B)",
    "both",
    "share of G not in B",
    "the same by chance",
    "Cohen's κ",
)


def overlap_variants_table(run: Run) -> str:
    """The overlap table against the other influence variants ("" when there are none)."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.overlap_variants):
            rows.append([ckpt.name, method, *_overlap_cells(ckpt.overlap_variants[method])])
    return markdown_table(OVERLAP_VARIANT_HEADERS, rows, left=2) if rows else ""


SOLVE_HEADERS = (
    "checkpoint", "method", "curvature", "solver", "damping", "iterations", "relative residual",
    "stopped because", "seconds",
)  # fmt: skip


def _solver(ckpt: Any, method: str) -> str:
    """The solver a scores record was computed with (from its settings)."""
    rec = ckpt.records.get(f"scores-{method}")
    score = rec.settings.get("score") if rec is not None else None
    return str(score.get("solver", MISSING)) if isinstance(score, dict) else MISSING


def solve_table(run: Run) -> str:
    """Markdown table of the inverse-HVP solves (methods without one are left out)."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.solves):
            s = ckpt.solves[method]
            res = s.relative_residual
            rows.append(
                [
                    ckpt.name,
                    method,
                    str(s.curvature),
                    _solver(ckpt, method),
                    MISSING if s.damping is None else f"{s.damping:.3g}",
                    fmt_count(s.iterations),
                    MISSING if res is None else f"{res:.2e}",
                    s.reason or "",
                    MISSING if s.seconds is None else f"{s.seconds:.0f}",
                ]
            )
    if not rows:
        return "(no solves recorded)"
    return markdown_table(SOLVE_HEADERS, rows, left=5)


FIDELITY_HEADERS = ("checkpoint", "method", "Spearman", "Pearson", "sign agreement", "n")


def fidelity_table(run: Run) -> str:
    """Markdown fidelity table: correlations of predicted and actual loss changes."""
    rows = []
    for ckpt in run.checkpoints:
        if ckpt.fidelity is None:
            not_run = run.config.get("fidelity_samples", 1) == 0
            label = "(not run: fidelity_samples = 0)" if not_run else "(missing)"
            rows.append([ckpt.name, label, MISSING, MISSING, MISSING, MISSING])
            continue
        for method in order_methods(ckpt.fidelity.summary):
            s = ckpt.fidelity.summary[method]
            rows.append(
                [
                    ckpt.name,
                    method,
                    fmt_corr(s.spearman),
                    fmt_corr(s.pearson),
                    fmt_rate(s.sign_agreement),
                    fmt_count(s.n),
                ]
            )
    return markdown_table(FIDELITY_HEADERS, rows, left=2)


def command_text(command: Sequence[Union[str, Path]], root: Path) -> str:
    """The recorded command as a shell line, path arguments (absolute once read) relative
    to `root`."""

    def arg(a: Union[str, Path]) -> str:
        return fileio.relative(a, root) if isinstance(a, Path) or os.path.isabs(a) else a

    return " ".join(shlex.quote(arg(a)) for a in command)


CSV_HEADER = ("checkpoint", "method", "k", "removed", "accuracy", "loss", "baseline_accuracy")


def csv_rows(run: Run) -> List[List[Any]]:
    """One row per checkpoint × method × k, in table order (floats at full precision)."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.sweeps):
            base = ckpt.baseline_for(method)
            base_acc = "" if base is None else repr(base.accuracy)
            for p in ckpt.sweeps[method].points:
                rows.append(
                    [ckpt.name, method, p.k, p.removed, repr(p.accuracy), repr(p.loss), base_acc]
                )
    return rows
