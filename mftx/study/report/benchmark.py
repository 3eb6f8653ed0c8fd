"""The methods benchmark: one row per scoring variant of a checkpoint, every measure side by side.

For each method (gradient rule, taylor, obd, magnitude, each influence
variant) and the random-k control: how the scores were computed (curvature,
damping, solver iterations, curvature products, seconds: ``scores-<method>.json``),
single-parameter fidelity (``fidelity.json``), group fidelity on random subsets
(``groupfid.json``), in-sample and held-out gain at the best k and at k = 5,000
(``heldout-<method>.json``, in-sample from ``sweep-<method>.json`` when there is
no held-out record), and the agreement of the gradient rule's flags with the
method's (Cohen's κ, with |G \\ B| / |G| beside its chance level; ``overlap-<method>.json``). Checkpoints without held-out records
have no rows (their tables are the plain report's).
"""

from __future__ import annotations

import math
import statistics as pystats
from typing import Any, Callable, Dict, List, Tuple

from .. import statistics
from ..protocol import FIXED_K
from ..records import Fidelity
from .cells import fmt_ci, fmt_gain, fmt_k, pick, solve_label
from .load import Checkpoint, Run, order_methods
from .summaries import RANDOM, in_sample, method_summary, random_control
from .tables import MISSING, fmt_corr, fmt_count, fmt_rate, markdown_table

__all__ = [
    "BENCHMARK_HEADERS",
    "FLAG_HEADERS",
    "benchmark_methods",
    "benchmark_rows",
    "benchmark_table",
    "flag_rows",
    "flag_table",
    "single_fidelity",
    "solve_label",
    "wilson",
]


def benchmark_methods(ckpt: Checkpoint) -> List[str]:
    """Every scoring variant the checkpoint's records mention, in table order."""
    found = set(ckpt.sweeps) | {m for m in ckpt.heldouts if m != RANDOM}
    found |= {m for m in ckpt.scores_info if "@" not in m}
    if ckpt.fidelity is not None:
        found |= set(ckpt.fidelity.summary)
    if ckpt.group_fidelity is not None:
        found |= set(ckpt.group_fidelity.summary)
    return order_methods(found)


def _empty(ckpt: str, method: str) -> Dict[str, Any]:
    keys = ("curvature", "damping", "iterations", "curvature_products", "seconds",
            "single_spearman", "single_spearman_lo", "single_spearman_hi", "single_n",
            "single_top_spearman", "single_top_n",
            "group_spearman", "group_spearman_lo", "group_spearman_hi",
            "in_sample_best_k", "in_sample_gain", "heldout_best_k_ab", "heldout_best_k_ba",
            "heldout_gain", "in_sample_gain_at_fixed_k", "heldout_gain_at_fixed_k",
            "false_positive_rate", "chance_rate", "kappa", "relative_residual", "converged",
            "solve")  # fmt: skip
    return {"checkpoint": ckpt, "method": method, **dict.fromkeys(keys), "fixed_k": FIXED_K}


def _group(ckpt: Checkpoint, method: str, row: Dict[str, Any]) -> None:
    gf = ckpt.group_fidelity
    s = None if gf is None else gf.summary.get(method, {}).get("random")
    if s is not None:
        lo, hi = s.get("spearman_interval") or [None, None]
        row.update(group_spearman=s.get("spearman"), group_spearman_lo=lo, group_spearman_hi=hi)


def single_fidelity(fid: Fidelity, method: str, resamples: int = 2000) -> Dict[str, Any]:
    """Single-parameter fidelity of `method`, on the uniformly random samples only (Spearman
    with a bootstrap 95 % interval) and, separately, on the methods' top candidates (which
    over-represent what each method ranks first)."""

    def pick(rand: bool):
        xs = [x for x in fid.samples if (x.origin == "random") == rand and method in x.predicted]
        return [x.predicted[method] for x in xs], [x.actual for x in xs]

    pred, actual = pick(True)
    top_pred, top_actual = pick(False)
    lo, hi = (statistics.bootstrap_interval(statistics.spearman, pred, actual,
                                            resamples=resamples, seed=0)
              if len(pred) > 2 else (None, None))  # fmt: skip
    return {
        "single_spearman": statistics.spearman(pred, actual) if len(pred) > 1 else None,
        "single_spearman_lo": lo, "single_spearman_hi": hi, "single_n": len(pred),
        "single_top_spearman": (statistics.spearman(top_pred, top_actual)
                                if len(top_pred) > 1 else None),
        "single_top_n": len(top_pred),
    }  # fmt: skip


def _method_row(ckpt: Checkpoint, method: str, run_solver: str = "minres") -> Dict[str, Any]:
    row = _empty(ckpt.name, method)
    info = ckpt.scores_info.get(method)
    if info is not None:
        row.update(curvature=info.curvature, damping=info.damping, iterations=info.iterations,
                   curvature_products=info.n_hvp, seconds=info.seconds,
                   relative_residual=info.relative_residual, converged=info.converged,
                   solve=solve_label(method, info, run_solver))  # fmt: skip
    if ckpt.fidelity is not None and method in ckpt.fidelity.summary:
        row.update(single_fidelity(ckpt.fidelity, method))
    _group(ckpt, method, row)
    ref = in_sample(ckpt, method)
    if ref is not None:
        row.update(in_sample_best_k=ref["best_k"], in_sample_gain=ref["gain"],
                   in_sample_gain_at_fixed_k=ref["gain_at_fixed_k"])  # fmt: skip
    h = ckpt.heldouts.get(method)
    if h is not None:
        held = method_summary(h, split=ckpt.split)["heldout"]
        ab, ba = held["folds"]
        row.update(heldout_best_k_ab=ab.get("best_k"), heldout_best_k_ba=ba.get("best_k"),
                   heldout_gain=held["mean_gain"],
                   heldout_gain_at_fixed_k=held["mean_gain_at_fixed_k"])  # fmt: skip
    overlap = ckpt.overlaps.get(method)
    if overlap is not None:  # NaN (shown n/a) when the gradient rule flags nothing
        row["false_positive_rate"] = overlap.false_positive_rate
        row["chance_rate"] = overlap.chance_rate
        row["kappa"] = overlap.kappa
    return row


def _random_row(ckpt: Checkpoint) -> Dict[str, Any]:
    row = _empty(ckpt.name, RANDOM)
    r = random_control(ckpt.heldouts[RANDOM])
    ab, ba = r["folds"]
    row.update(curvature_products=0, heldout_best_k_ab=ab.get("best_k"),
               heldout_best_k_ba=ba.get("best_k"), heldout_gain=r["mean_gain"],
               in_sample_best_k=pick(r["reference"], "best_k"),
               in_sample_gain=pick(r["reference"], "gain"))  # fmt: skip
    if r["fixed"] is not None:
        row["in_sample_gain_at_fixed_k"] = r["fixed"]["mean"] - r["baseline"]
        base = pystats.fmean(f["baseline"] for f in r["folds"])
        row["heldout_gain_at_fixed_k"] = r["fixed_heldout"] - base
    return row


def benchmark_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint with held-out records: a row per method, then the random-k control."""
    rows = []
    for ckpt in run.checkpoints:
        if not ckpt.heldouts:
            continue
        solver = run.config.get("solver") or "minres"
        rows += [_method_row(ckpt, m, solver) for m in benchmark_methods(ckpt)]
        if RANDOM in ckpt.heldouts:
            rows.append(_random_row(ckpt))
    return rows


BENCHMARK_HEADERS = (
    "checkpoint", "method", "curvature", "damping", "solve", "curvature products",
    "seconds", "single-parameter Spearman, random samples [95 % CI]",
    "single-parameter Spearman, top candidates", "group Spearman (random subsets, pooled over k)",
    "in-sample: best k", "in-sample gain", "held-out: best k (A→B / B→A)", "held-out gain (mean)",
    f"in-sample gain at k = {FIXED_K:,}", f"held-out gain at k = {FIXED_K:,} (mean)",
    "gradient rule vs method: κ (share of G not in B; by chance)",
)  # fmt: skip


def _cell(x: Any, fmt: Callable[[Any], str]) -> str:
    """``—`` where nothing was measured (None), else `fmt` (which shows NaN as ``n/a``)."""
    return MISSING if x is None else fmt(x)


def benchmark_table(run: Run) -> str:
    """Markdown methods benchmark ("" without held-out records); not run: ``—``."""
    rows = benchmark_rows(run)
    if not rows:
        return ""
    body = []
    for r in rows:
        ks = (r["heldout_best_k_ab"], r["heldout_best_k_ba"])
        body.append([
            r["checkpoint"], "random-k" if r["method"] == RANDOM else r["method"],
            r["curvature"] or MISSING, _cell(r["damping"], lambda x: f"{x:g}"),
            _cell(r["solve"], str), _cell(r["curvature_products"], fmt_count),
            _cell(r["seconds"], lambda x: f"{x:.1f}"),
            _cell(r["single_spearman"], lambda x, lo=r["single_spearman_lo"],
                  hi=r["single_spearman_hi"]: fmt_ci(x, [lo, hi])),
            _cell(r["single_top_spearman"], fmt_corr),
            _cell(r["group_spearman"], lambda x, lo=r["group_spearman_lo"],
                  hi=r["group_spearman_hi"]: fmt_ci(x, [lo, hi])),
            fmt_k(r["in_sample_best_k"]), _cell(r["in_sample_gain"], fmt_gain),
            MISSING if ks == (None, None) else " / ".join(fmt_k(k) for k in ks),
            _cell(r["heldout_gain"], fmt_gain), _cell(r["in_sample_gain_at_fixed_k"], fmt_gain),
            _cell(r["heldout_gain_at_fixed_k"], fmt_gain),
            _cell(r["kappa"], lambda x, r=r: f"{fmt_corr(x)} ({fmt_rate(r['false_positive_rate'])}; "
                  f"{fmt_rate(r['chance_rate'])})"),
        ])  # fmt: skip
    return markdown_table(BENCHMARK_HEADERS, body, left=2)


# --------------------------------------------------------------------------- flag precision


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score 95 % interval of a proportion (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def flag_rows(run: Run) -> List[Dict[str, Any]]:
    """Each flagging method's claim against the measured effect of zeroing.

    On the uniformly random single-parameter fidelity samples: of those the method
    flags (predicted to lower the validation loss when zeroed), the share whose
    measured change is negative — the precision, with its Wilson interval — beside
    the same share over every random sample (what flagging at random gives).
    """
    rows = []
    for ckpt in run.checkpoints:
        fid = ckpt.fidelity
        if fid is None:
            continue
        rand = [x for x in fid.samples if x.origin == "random"]
        if not rand:
            continue
        base = sum(x.actual < 0 for x in rand) / len(rand)
        for method in order_methods(fid.summary):
            flagged = [x for x in rand if method in x.predicted and x.predicted[method] < 0]
            hits = sum(x.actual < 0 for x in flagged)
            lo, hi = wilson(hits, len(flagged))
            rows.append({
                "checkpoint": ckpt.name, "method": method, "random_samples": len(rand),
                "flagged": len(flagged), "helped": hits,
                "precision": hits / len(flagged) if flagged else None,
                "precision_lo": None if not flagged else lo,
                "precision_hi": None if not flagged else hi, "base_rate": base,
            })  # fmt: skip
    return rows


FLAG_HEADERS = (
    "checkpoint", "method", "random samples", "flagged", "zeroing lowered the loss",
    "precision [95 % CI]", "the same over all random samples",
)  # fmt: skip


def flag_table(run: Run) -> str:
    """Markdown: flag precision against the measured effect ("" without fidelity samples)."""
    rows = flag_rows(run)
    if not rows:
        return ""
    body = [
        [r["checkpoint"], r["method"], fmt_count(r["random_samples"]), fmt_count(r["flagged"]),
         fmt_count(r["helped"]),
         _cell(r["precision"], lambda x, r=r: fmt_ci(x, [r["precision_lo"], r["precision_hi"]])),
         fmt_rate(r["base_rate"])]
        for r in rows
    ]  # fmt: skip
    return markdown_table(FLAG_HEADERS, body, left=2)
