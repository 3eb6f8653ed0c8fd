"""``report.md`` (`render_markdown`) and the CLI's tables (`format_tables`).

The held-out sections (`mftx.study.report.sections`) follow the plain report's table
they are placed after; without their records they are absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ... import fileio
from .load import Run
from .names import COMBINED_PLOT, plot_name
from .sections import section_parts
from .tables import (
    NA,
    command_text,
    fidelity_table,
    fmt_accuracy,
    fmt_count,
    masking_table,
    overlap_table,
    overlap_variants_table,
    solve_table,
)

__all__ = ["format_tables", "render_markdown"]


def _checkpoint_lines(run: Run, root: Path) -> List[str]:
    lines = []
    for c in run.checkpoints:
        target = "none" if c.target is None else fmt_accuracy(c.target)
        step = c.metadata.get("step", NA)
        lines.append(
            f"- `{c.name}`: target {target}, step {step}, baseline "
            f"{fmt_accuracy(None if c.baseline is None else c.baseline.accuracy)}, "
            f"{fmt_count(c.analysed_params)} of {fmt_count(c.total_params)} parameters analysed"
            + (f" — `{fileio.relative(c.path, root)}`" if c.path else "")
        )
    return lines


def _plot_lines(run: Run, plots: Optional[List[Path]]) -> List[str]:
    if plots is None:
        return ["Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    lines = [f"![{c.name}]({plot_name(c.name)})" for c in run.checkpoints]
    if run.checkpoints:
        lines.append(f"\n![all checkpoints]({COMBINED_PLOT})")
    return lines


def _variants_section(run: Run) -> str:
    table = overlap_variants_table(run)
    if not table:
        return ""
    return (
        "\n\nThe same against the other influence variants (B from each variant's "
        "scores):\n\n" + table
    )


def render_markdown(run: Run, plots: Optional[List[Path]], root: Path) -> str:
    """The text of ``report.md`` written in directory `root` (paths relative to it;
    ``plots`` None: plots were skipped)."""
    command = command_text(run.command, root) if run.command else "(not recorded)"
    where = (
        "(not recorded)" if run.directory is None else f"`{fileio.relative(run.directory, root)}`"
    )
    parts = [
        "# Mask fine-tuning report",
        f"Run directory: {where} (paths here are relative to this report's directory)",
        f"Produced by:\n\n```\n{command}\n```",
        "## Checkpoints\n\n" + ("\n".join(_checkpoint_lines(run, root)) or "(none)"),
        "## Masking: best sweep point per checkpoint and method\n\n"
        "Best dev accuracy over the masking sweep's k grid (ties: the smallest k); "
        "improvement in accuracy points against the unmasked checkpoint, negative or zero "
        "when no k helped; share of model = parameters removed / all parameters.\n\n"
        + masking_table(run),
        *section_parts(run, "masking", plots),
        "## Overlap of gradient-flagged and influence-beneficial parameters\n\n"
        "Share of the gradient-flagged parameters (G) that influence does not call "
        "beneficial (B), n/a when G is 0, beside the same share for flags drawn "
        "independently (1 − B / n), and Cohen's κ of the two flags (0: chance agreement). "
        "Influence is an approximation too: this is agreement, not a false-positive rate.\n\n"
        + overlap_table(run)
        + _variants_section(run),
        "## Fidelity of predicted loss changes\n\n"
        "Predicted against actual change of validation loss when a sampled parameter "
        "alone is zeroed.\n\n" + fidelity_table(run),
        *section_parts(run, "fidelity", plots),
        "## Inverse-HVP solves\n\n"
        "How each influence solve (H + λI) s = ∇L_val ended (damping: the λ used, also when "
        'chosen by `damping="auto"`): at the tolerance, at the iteration cap, or for CG at '
        "non-positive curvature; Lanczos and EK-FAC have no iterations of their own.\n\n"
        + solve_table(run),
        *section_parts(run, "solves", plots),
        "## Accuracy against k\n\n" + "\n".join(_plot_lines(run, plots)),
    ]
    incomplete = run.incomplete()
    if plots is None:
        incomplete = [*incomplete, "plots: skipped, matplotlib is not installed"]
    body = "\n".join(f"- {line}" for line in incomplete) if incomplete else "Nothing missing."
    parts.append("## Incomplete\n\n" + body)
    return "\n\n".join(parts) + "\n"


def format_tables(run: Run) -> str:
    """The tables with headings, and what is incomplete: for printing by the CLI."""
    parts = [
        "## Masking: best sweep point per checkpoint and method",
        masking_table(run),
        *section_parts(run, "masking"),
        "## Overlap of gradient-flagged and influence-beneficial parameters",
        overlap_table(run),
    ]
    variants = overlap_variants_table(run)
    if variants:
        parts += ["## Overlap with the other influence variants", variants]
    parts += [
        "## Fidelity of predicted loss changes",
        fidelity_table(run),
        *section_parts(run, "fidelity"),
        "## Inverse-HVP solves",
        solve_table(run),
        *section_parts(run, "solves"),
    ]
    incomplete = run.incomplete()
    if incomplete:
        parts += ["## Incomplete", "\n".join(f"- {line}" for line in incomplete)]
    return "\n\n".join(parts) + "\n"
