"""The held-out sections' figures, one PNG per checkpoint and section (see `sections`).

- ``heldout-<checkpoint>.png``: per method, accuracy against k of each fold's
  score set on its evaluation half, the reference curve (all rows), the
  unmasked and recalibrated baselines and the random-k control (mean ± sd);
- ``groupfid-<checkpoint>.png``: per method, predicted against actual change of
  loss of every zeroed subset (symmetric-log axes, colour: k; marker: origin);
- ``location-<checkpoint>.png``: per method, enrichment of its largest top-k set
  by transformer block and module kind (log2 colour scale, values printed);
- ``spectrum-<checkpoint>.png``: the spectral density (`mftx.study.report.spectrum_tables`).

Each drawing function takes a checkpoint and matplotlib's ``Figure`` class and
returns a figure, or None when the checkpoint lacks the records.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

from .load import Checkpoint, order_methods
from .location_tables import layer_kinds, shown_sets
from .spectrum_tables import spectrum_figure
from .summaries import FOLDS, RANDOM, method_summary, protocol_methods, random_control

__all__ = ["FIGURES", "groupfid_figure", "heldout_figure", "location_figure"]

ARROW = {"A->B": "A→B", "B->A": "B→A"}


def _grid(Figure: Any, n: int, width: float, height: float):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _line(ax: Any, curve: Dict[int, Any], rows: str, **kw: Any) -> None:
    ks = sorted(k for k in curve if k > 0)
    if ks:
        ax.plot(ks, [100 * curve[k].rows[rows].accuracy for k in ks], **kw)


def _random_band(ax: Any, ckpt: Checkpoint) -> None:
    h = ckpt.heldouts.get(RANDOM)
    if h is None:
        return
    per_k = random_control(h)["per_k"]
    ks = sorted(k for k in per_k if k > 0)
    if not ks:
        return
    mean = [100 * per_k[k]["all"]["mean"] for k in ks]
    sd = [100 * per_k[k]["all"]["sd"] for k in ks]
    ax.plot(ks, mean, color="grey", linewidth=1, label="random-k, all rows (mean ± sd)")
    ax.fill_between(ks, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                    color="grey", alpha=0.2, linewidth=0)  # fmt: skip


def heldout_figure(ckpt: Checkpoint, Figure: Any) -> Optional[Any]:
    """Accuracy against k under both protocols, a panel per method."""
    methods = protocol_methods(ckpt)
    if not methods:
        return None
    from matplotlib.ticker import NullFormatter

    fig, axes = _grid(Figure, len(methods), 4.8, 3.8)
    for ax, method in zip(axes, methods):
        h = ckpt.heldouts[method]
        folds = method_summary(h)["heldout"]["folds"]
        _line(ax, h.curve("all"), "all", color="black", marker="o", markersize=3,
              label="reference: all-row scores, all rows")  # fmt: skip
        ax.axhline(100 * h.baseline.rows["all"].accuracy, color="black", linestyle="--",
                   linewidth=0.8, label="unmasked, all rows")  # fmt: skip
        for (name, _, ev), fold, color in zip(FOLDS, folds, ("C0", "C1")):
            curve = h.curve(fold["scores"])
            _line(ax, curve, ev, color=color, marker="o", markersize=3,
                  label=f"{ARROW[name]}: {fold['scores']} scores, rows {ev}")  # fmt: skip
            ax.axhline(100 * h.baseline.rows[ev].accuracy, color=color, linestyle="--",
                       linewidth=0.8, label=f"unmasked, rows {ev}")  # fmt: skip
            ax.axhline(100 * h.baseline.recal[name], color=color, linestyle=":", linewidth=1,
                       label=f"recalibrated, rows {ev}")  # fmt: skip
            k = fold.get("best_k")
            if k is not None and k > 0:
                ax.plot([k], [100 * curve[k].rows[ev].accuracy], marker="*", markersize=11,
                        color=color, linestyle="none")  # fmt: skip
        _random_band(ax, ckpt)
        if any(k > 0 for k in h.curve("all")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{ckpt.name}: {method}", fontsize="medium")
        ax.set_xlabel("parameters masked (k); ★ held-out best k")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="best", fontsize="x-small")
    return fig


_MARKERS = {"random": "o", "top": "^", "flagged": "s"}


def _linthresh(values: List[float]) -> float:
    small = sorted(abs(v) for v in values if v != 0 and math.isfinite(v))
    return small[len(small) // 10] if small else 1e-6


def _symmetric_grid(smallest: float, values: List[float]) -> List[float]:
    """Points from -max|v| to max|v|, geometric on each side of 0 (a straight line in symlog)."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=1.0) or 1.0
    lo = min(smallest, top)
    n = 60
    side = [lo * (top / lo) ** (i / (n - 1)) for i in range(n)]
    return [-v for v in reversed(side)] + [0.0] + side


def _symlog_ticks(thresh: float, values: List[float]) -> List[float]:
    """0 and at most three decades on each side, all beyond the linear range."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=thresh)
    first = math.ceil(math.log10(thresh)) + 1
    last = math.floor(math.log10(top)) if top > 0 else first
    decades = list(range(first, last + 1))
    step = max(1, math.ceil(len(decades) / 3))
    side = [10.0**d for d in decades[::-1][::step][::-1]]
    return [-v for v in reversed(side)] + [0.0] + side


def groupfid_figure(ckpt: Checkpoint, Figure: Any) -> Optional[Any]:
    """Predicted against actual change of loss per zeroed subset, a panel per method."""
    gf = ckpt.group_fidelity
    if gf is None or not gf.samples:
        return None
    from matplotlib.colors import LogNorm

    methods = order_methods({m for s in gf.samples for m in s.predicted})
    if not methods:
        return None
    ks = [s.k for s in gf.samples]
    norm = LogNorm(min(ks), max(ks)) if min(ks) < max(ks) else LogNorm(min(ks) / 2, max(ks) * 2)
    fig, axes = _grid(Figure, len(methods), 4.4, 3.8)
    mappable = None
    for ax, method in zip(axes, methods):
        xs_all, ys_all = [], []
        for origin, marker in _MARKERS.items():
            own = origin if origin == "random" else f"{origin}-{method}"
            pts = [s for s in gf.samples if s.origin == own and method in s.predicted]
            if not pts:
                continue
            xs, ys = [s.predicted[method] for s in pts], [s.actual for s in pts]
            xs_all += xs
            ys_all += ys
            mappable = ax.scatter(xs, ys, c=[s.k for s in pts], cmap="viridis", norm=norm,
                                  marker=marker, s=18, alpha=0.8, label=origin)  # fmt: skip
        # One linear threshold for both axes: the identity line stays straight.
        thresh = _linthresh(xs_all + ys_all)
        diag = _symmetric_grid(thresh / 10, xs_all + ys_all)
        ax.plot(
            diag, diag, color="black", linewidth=0.6, linestyle="--", label="actual = predicted"
        )
        ax.set_xscale("symlog", linthresh=thresh)
        ax.set_yscale("symlog", linthresh=thresh)
        ticks = _symlog_ticks(thresh, xs_all + ys_all)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize="small")
        ax.tick_params(axis="x", labelrotation=30)
        stats = gf.summary.get(method, {}).get("random", {})
        rho = stats.get("spearman")
        rho_text = "n/a" if rho is None or math.isnan(rho) else f"{rho:.2f}"
        ax.set_title(f"{ckpt.name}: {method} (Spearman, random: {rho_text})", fontsize="medium")
        ax.set_xlabel("predicted change of loss")
        ax.set_ylabel(f"actual change of loss (rows {gf.rows})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, label="subset size k")
    return fig


def location_figure(ckpt: Checkpoint, Figure: Any) -> Optional[Any]:
    """Enrichment of each method's largest top-k set by block and module kind."""
    found = {m: loc for m, loc in ckpt.locations.items()
             if shown_sets(loc) and shown_sets(loc)[0] != "flagged"}  # fmt: skip
    if not found:
        return None
    methods = order_methods(found)
    fig, axes = _grid(Figure, len(methods), 4.4, 3.6)
    image = None
    for ax, method in zip(axes, methods):
        name = shown_sets(found[method])[0]
        layers, kinds, cells = layer_kinds(found[method], name)
        grid = [[_log2(cells.get((lay, kind))) for kind in kinds] for lay in layers]
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
        for i, lay in enumerate(layers):
            for j, kind in enumerate(kinds):
                e = cells.get((lay, kind))
                if e is not None:
                    dark = abs(_log2(e)) > 1.5
                    ax.text(j, i, f"{e:.1f}", ha="center", va="center", fontsize="x-small",
                            color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(len(layers)), [f"layer {x}" if x.isdigit() else x for x in layers],
                      fontsize="small")  # fmt: skip
        ax.set_title(f"{ckpt.name}: {method} {name}", fontsize="medium")
    if image is not None:
        fig.colorbar(image, ax=axes, label="log2 enrichment (0 = chance)")
    return fig


def _log2(e: Optional[float]) -> float:
    if e is None:
        return math.nan
    return -3.0 if e <= 0 else max(-3.0, min(3.0, math.log2(e)))


#: Section key -> drawing function (`mftx.study.report.sections.Section.plot`).
FIGURES: Dict[str, Callable[[Checkpoint, Any], Optional[Any]]] = {
    "heldout": heldout_figure,
    "groupfid": groupfid_figure,
    "location": location_figure,
    "spectrum": spectrum_figure,
}
