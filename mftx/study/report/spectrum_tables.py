"""The curvature spectrum per checkpoint: λ_min, λ_max, trace, and the spectral density.

Reads the checkpoint's ``spectrum.json`` (or ``spectrum-<label>.json``, one per
curvature) once that stage is registered as a record kind; its result is an
`mftx.curvature.spectra.Spectrum`-like object (``lambda_min``, ``lambda_max``, their
Lanczos error bounds, ``trace``, ``trace_std``, ``trace_method``, ``n``,
``n_matvec``, ``seconds`` and ``density()``). Without such records there are
no rows and no section.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .cells import defined
from .load import Checkpoint, Run
from .tables import MISSING, fmt_count, markdown_table

__all__ = ["SPECTRUM_HEADERS", "spectra", "spectrum_figure", "spectrum_rows", "spectrum_table"]


def spectra(ckpt: Checkpoint) -> List[Tuple[str, Any]]:
    """(label, spectrum) of the checkpoint's spectrum records, by file name ("" for
    ``spectrum.json``)."""
    out = []
    for stem in sorted(ckpt.records):
        if stem == "spectrum" or stem.startswith("spectrum-"):
            out.append((stem.partition("-")[2], ckpt.records[stem].result))
    return out


def spectrum_rows(run: Run) -> List[Dict[str, Any]]:
    """One row per checkpoint and spectrum record."""
    keys = ("n", "lambda_min", "lambda_min_error", "lambda_max", "lambda_max_error", "trace",
            "trace_std", "trace_method", "n_matvec", "seconds")  # fmt: skip
    return [
        {"checkpoint": ckpt.name, "label": label, **{k: getattr(s, k, None) for k in keys}}
        for ckpt in run.checkpoints
        for label, s in spectra(ckpt)
    ]


SPECTRUM_HEADERS = ("checkpoint", "curvature", "λ_min", "λ_max", "trace", "products", "seconds")


def _value(x: Optional[float], err: Optional[float] = None) -> str:
    if not defined(x):
        return MISSING
    return f"{x:.4g}" if not defined(err) or not err else f"{x:.4g} ± {err:.1e}"


def spectrum_table(run: Run) -> str:
    """Markdown: extreme eigenvalues (± Lanczos bound), trace (± standard error) ("" if none)."""
    rows = spectrum_rows(run)
    if not rows:
        return ""
    body = [
        [r["checkpoint"], r["label"] or MISSING, _value(r["lambda_min"], r["lambda_min_error"]),
         _value(r["lambda_max"], r["lambda_max_error"]),
         _value(r["trace"], r["trace_std"]) + (f" ({r['trace_method']})" * bool(r["trace_method"])),
         MISSING if r["n_matvec"] is None else fmt_count(r["n_matvec"]),
         MISSING if r["seconds"] is None else f"{r['seconds']:.1f}"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(SPECTRUM_HEADERS, body, left=2)


def spectrum_figure(ckpt: Checkpoint, Figure: Any) -> Optional[Any]:
    """The smoothed spectral density of each spectrum record (log scale), one line each."""
    found = [(label, s) for label, s in spectra(ckpt) if hasattr(s, "density")]
    if not found:
        return None
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for label, s in found:
        grid, density = s.density()
        ax.plot(grid.tolist(), density.tolist(), label=label or "curvature")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"{ckpt.name}: spectral density")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig
