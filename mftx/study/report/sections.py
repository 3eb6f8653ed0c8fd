"""The report's sections beyond the reference study's tables, each present only with its records.

A `Section` names its rows (for ``results-<key>.csv`` and ``results.json``'s
``tables``), its markdown body and the plots it shows; a run without the
section's records gives no rows and no text, so the report of such a run is
unchanged. `SECTIONS` is the list, in report order; ``after`` places each one
after a table of the plain report (``masking``, ``fidelity`` or ``solves``).

Adding a section is one `Section` entry: a rows function reading the
checkpoints' records, a markdown function built from those rows, and, for a
plot, a drawing function registered in `mftx.study.report.figures` under the
section's key. The spectrum section (`mftx.study.report.spectrum_tables`) is written
that way and shows as soon as ``spectrum.json`` records are registered and
written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .benchmark import benchmark_rows, benchmark_table, flag_rows, flag_table
from .byk_tables import byk_rows, byk_table
from .groupfid_tables import (
    group_correlation_table,
    group_direction_table,
    group_mean_table,
    group_rows,
)
from .heldout_tables import (
    control_rows,
    control_table,
    fresh_rows,
    fresh_table,
    protocol_rows,
    protocol_table,
    split_lines,
    split_rows,
    split_table,
)
from .load import Run
from .location_tables import kind_table, layer_table, location_rows
from .names import figure_name
from .seeds import seed_rows, seed_table
from .sensitivity_tables import sensitivity_rows, sensitivity_table
from .spectrum_tables import spectrum_rows, spectrum_table

__all__ = ["SECTIONS", "Section", "section_parts", "section_rows"]

Rows = List[Dict[str, Any]]


@dataclass(frozen=True)
class Section:
    """One report section, present when ``rows(run)`` has rows.

    ``rows(run)``: the rows for CSV and JSON; ``intro``: the text under the
    heading; ``parts``: functions of the run giving the markdown that follows
    (tables, with text of their own), "" to leave one out; ``plot``: a figure
    per checkpoint, file `figure_name` (drawn by `mftx.study.report.figures.FIGURES`).
    """

    key: str
    heading: str
    after: str
    rows: Callable[[Run], Rows]
    intro: str
    parts: Tuple[Callable[[Run], str], ...]
    plot: bool = False

    def body(self, run: Run) -> str:
        """Markdown under the heading ("" when the run has no rows for it)."""
        if not self.rows(run):
            return ""
        return _join(self.intro, *(part(run) for part in self.parts))


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def _split_text(run: Run) -> str:
    return "\n".join(split_lines(run))


def _group_directions(run: Run) -> str:
    table = group_direction_table(run)
    return table and _join(
        "Per subset size, in-sample (the scores' own rows: all-rows scores on all rows, "
        "half A's on A, half B's on B) and across halves (one half's scores, the other "
        "half's loss). In-sample is the approximation alone; across halves adds whether "
        "the change transfers to rows that did not choose. Spearman across the random "
        "subsets of that size, bootstrap 95 % intervals:",
        table,
    )


def _group_means(run: Run) -> str:
    return _join(
        "Mean predicted and actual change of loss of the random subsets, the method's top-k "
        "and random k-subsets of its flagged set:",
        group_mean_table(run),
    )


HELDOUT_INTRO = (
    "Reference protocol: scores (validation gradient), best k and accuracy all on the full "
    "dev set. Held-out protocol, seeded two-fold cross-fitting: on half A the validation "
    "gradient, the scores that need it and the best k are chosen and accuracy is measured "
    "on half B (A→B); then B→A. k = 0 (no masking) is always a candidate. Gains are "
    "against the unmasked model on the same rows. Beyond recalibration (fair): k chosen on "
    "the selection half by its accuracy after its own logit offset, then (masked + offset) "
    "− (unmasked + offset) on the evaluation half, both offsets from the selection half; a "
    "method that changes nothing scores 0. Records without the selection half's "
    "recalibrated accuracy (written before it was recorded) take the uncalibrated k. "
    "Brackets: 95 % paired bootstrap intervals over the evaluation rows (records with "
    "per-row predictions). The random-k control masks k uniformly "
    "random analysed parameters (mean ± sd over draws; its best k is chosen on the mean). "
    "Methods without a validation gradient (gradient rule, magnitude) have one score set; "
    "only their k is chosen per fold. The rows of each half are in `split.json` "
    "(indices and SHA-256):"
)
CONTROLS_INTRO = (
    "Recalibration alone (the unmasked model with the logit offset chosen on the selection "
    "half, measured on the evaluation half) against masking at the held-out best k; the "
    "k chosen after recalibration and the masked model with its own offset; beyond "
    "recalibration = (masked + offset) − (unmasked + offset), with its paired bootstrap "
    "interval where the record has per-row predictions; the old column (masked without an "
    "offset − the recalibrated unmasked model) for comparison; and the share of dev rows "
    "predicted positive (class 1) before and after masking at each protocol's best k. The "
    "reference protocol has no recalibration control: its offset would be chosen on the "
    "rows it is measured on."
)
SPLITS_INTRO = (
    "The two-fold cross-fitting repeated with other split seeds of the dev rows (each "
    "split's fold scores and sweeps in `splits/seed<N>/`; the random-k control on the main "
    "split only): the held-out "
    "gain and the gain beyond recalibration (means of the two folds) over the splits — "
    "mean, split-to-split sd and range — and how many splits' paired bootstrap intervals "
    "lie above or below 0. Splits of the same dev rows are not independent: the spread "
    "says how much one split's answer depends on the draw, not a confidence interval."
)
FRESH_INTRO = (
    "SST-2 training rows the checkpoint was not fine-tuned on (a seeded draw, row numbers "
    "and their SHA-256 in `fresh-<method>.json`), never used for any choice. On dev: the "
    "scores (validation gradient of all dev rows), the k (best dev accuracy; k = 0, no "
    "masking, a candidate), the logit offset (best on all dev rows) and the k after "
    "recalibration (best dev accuracy after each masked model's own offset). Measured once "
    "on the fresh rows: gain (masked − unmasked), recalibration alone (unmasked + offset − "
    "unmasked) and beyond recalibration ((masked + its offset) − (unmasked + its offset)), "
    "with paired bootstrap 95 % intervals over the fresh rows and McNemar's exact test."
)
BYK_INTRO = (
    'Gain at every k of the sweep, "reference / held-out" in accuracy points: the '
    "reference protocol (scores and accuracy on all dev rows) and the mean over the two "
    "folds of the held-out gain at that k (scores from the selection half, accuracy on the "
    "evaluation half; no k is chosen). Against the unmasked model on the same rows; the "
    "random-k control averages its draws."
)
SEEDS_INTRO = (
    "Checkpoints with the same target accuracy from different fine-tuning seeds: mean ± "
    "sample sd across them of the reference gain, the held-out gain (mean of the folds) "
    "and the gain beyond recalibration, in accuracy points, with the 95 % Student-t "
    "interval across the checkpoints in brackets ((n = …): checkpoints that have the "
    "measure, when fewer than all)."
)
GROUPFID_INTRO = (
    "Subsets of k analysed parameters zeroed at once. First table: actual change of loss "
    "measured on evaluation half B, predicted as the sum of per-parameter predictions from "
    "scores of half A (the other directions follow where both halves were measured). Spearman and Pearson across subsets, bootstrap 95 % intervals in brackets; "
    "`+ ½ θ_Sᵀ H θ_S`: taylor plus the quadratic group term (the full second-order "
    "expansion) on the subsets where it was computed."
)
BENCHMARK_INTRO = (
    "Every scoring variant of each checkpoint with held-out records: curvature products "
    "(Hessian- or GGN-vector products) and seconds of the scores from all dev rows, "
    "single-parameter and group fidelity (Spearman), gain at the best k and at "
    "k = 5,000 under both protocols, and how the gradient rule's flags agree with the "
    "method's: Cohen's κ (0 = chance), with the share of the gradient-flagged set the "
    "method does not call beneficial beside what independent flags would give. — : not "
    "run or not recorded."
)
FLAGS_INTRO = (
    "Where a method flags parameters (predicted to lower the validation loss when zeroed), "
    "how often zeroing one of them alone did lower it, on the uniformly random "
    "single-parameter fidelity samples: the precision with its Wilson 95 % interval, beside "
    "the share over every random sample (what flagging at random would give). Measured "
    "effects, not another approximation, are the reference here."
)
LOCATION_INTRO = (
    "Each method's largest top-k set and its flagged set: enrichment (share of the set / "
    "share of all analysed entries; 1.00× = chance) with the share of the set in "
    "parentheses, by module kind and weights against biases, then by transformer block."
)
SENSITIVITY_INTRO = (
    "The same influence solve at several iteration caps (MINRES, CG) or ranks (Lanczos low "
    "rank), each named by what it computed, with its held-out gain and gain beyond "
    "recalibration (mean of the two folds, paired bootstrap 95 % intervals), and how much "
    "the next longer setting changes it: the share of its top-k entries the next one "
    "keeps, and the relative change of the scores. High overlap and small change: more "
    "iterations would not change the answer."
)
SPECTRUM_INTRO = (
    "Extreme eigenvalues of the curvature (± the Lanczos error bound), its trace (± the "
    "standard error of the stochastic estimate) and the curvature products spent; the "
    "plot is the smoothed spectral density (stochastic Lanczos quadrature)."
)

SECTIONS: Sequence[Section] = (
    Section("heldout", "Masking: reference vs held-out protocol", "masking", protocol_rows,
            HELDOUT_INTRO, (_split_text, protocol_table), plot=True),
    Section("controls", "Controls: recalibration and predicted-class balance", "masking",
            control_rows, CONTROLS_INTRO, (control_table,)),
    Section("splits", "Repeated splits: the held-out protocol on other halves of dev", "masking",
            split_rows, SPLITS_INTRO, (split_table,)),
    Section("fresh", "Fresh test set: chosen on dev, measured once", "masking", fresh_rows,
            FRESH_INTRO, (fresh_table,)),
    Section("byk", "Masking: gain at every k under both protocols", "masking", byk_rows,
            BYK_INTRO, (byk_table,)),
    Section("seeds", "Gains across fine-tuning seeds", "masking", seed_rows, SEEDS_INTRO,
            (seed_table,)),
    Section("groupfid", "Group fidelity: zeroing whole subsets", "fidelity", group_rows,
            GROUPFID_INTRO, (group_correlation_table, _group_directions, _group_means),
            plot=True),
    Section("benchmark", "Methods benchmark", "solves", benchmark_rows, BENCHMARK_INTRO,
            (benchmark_table,)),
    Section("flags", "Flags against the measured effect of zeroing", "solves", flag_rows,
            FLAGS_INTRO, (flag_table,)),
    Section("sensitivity", "Sensitivity of truncated solves", "solves", sensitivity_rows,
            SENSITIVITY_INTRO, (sensitivity_table,)),
    Section("location", "Where the removed parameters live", "solves", location_rows,
            LOCATION_INTRO, (kind_table, layer_table), plot=True),
    Section("spectrum", "Curvature spectrum", "solves", spectrum_rows, SPECTRUM_INTRO,
            (spectrum_table,), plot=True),
)  # fmt: skip


def section_rows(run: Run) -> Dict[str, Rows]:
    """Rows of every section that has any, by section key."""
    out = {}
    for s in SECTIONS:
        rows = s.rows(run)
        if rows:
            out[s.key] = rows
    return out


def _figures(s: Section, run: Run, plots: Optional[List[Path]]) -> str:
    if not s.plot or not plots:
        return ""
    names = {p.name for p in plots}
    return "\n".join(
        f"![{c.name}]({figure_name(s.key, c.name)})"
        for c in run.checkpoints
        if figure_name(s.key, c.name) in names
    )


def section_parts(run: Run, after: str, plots: Optional[List[Path]] = None) -> List[str]:
    """Markdown (heading, body, figures) of the sections placed after table `after`."""
    parts = []
    for s in SECTIONS:
        if s.after != after:
            continue
        body = s.body(run)
        if body:
            parts.append(_join(f"## {s.heading}", body, _figures(s, run, plots)))
    return parts
