"""The masking table under both protocols, and the controls table.

Rows are dicts (accuracies as fractions, None where undefined) for CSV and
JSON; the markdown tables are rendered from the same rows. Only checkpoints
with held-out records (``heldout-<method>.json``) have rows.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..protocol import FIXED_K
from .cells import (
    fmt_gain,
    fmt_gain_ci,
    fmt_k,
    fmt_pm,
    fmt_pm_gain,
    fmt_positive,
    pick,
    positive_share,
    solve_label,
)
from .load import Run, order_methods
from .summaries import RANDOM, mean_sd, method_summary, protocol_methods, random_control
from .tables import MISSING, fmt_accuracy, fmt_count, markdown_table

__all__ = [
    "CONTROL_HEADERS",
    "FRESH_HEADERS",
    "PROTOCOL_HEADERS",
    "control_rows",
    "control_table",
    "fresh_rows",
    "fresh_table",
    "protocol_rows",
    "protocol_table",
    "split_lines",
    "split_rows",
    "split_table",
]

ARROW = {"A->B": "A→B", "B->A": "B→A"}


def _fold_key(name: str) -> str:
    return name.replace("->", "").lower()  # "A->B" -> "ab"


def _row(ckpt: str, method: str, draws: Any, ref: Dict[str, Any], folds: List[Dict[str, Any]],
         **means: Any) -> Dict[str, Any]:  # fmt: skip
    """A protocol row; `ref` and `folds` as the summaries give them (``sd``: over draws)."""
    row: Dict[str, Any] = {
        "checkpoint": ckpt, "method": method, "draws": draws, "baseline": ref.get("baseline"),
        "reference_best_k": ref.get("best_k"), "reference_accuracy": ref.get("accuracy"),
        "reference_accuracy_sd": ref.get("sd"), "reference_gain": ref.get("gain"),
    }  # fmt: skip
    for fold in folds:
        key = _fold_key(fold["fold"])
        for field in ("best_k", "accuracy", "gain"):
            row[f"{key}_{field}"] = fold.get(field)
        row[f"{key}_accuracy_sd"] = fold.get("sd")
    return {**row, "fixed_k": FIXED_K, **means}


def _ci(ci: Any, key: str) -> Dict[str, Any]:
    """The interval's ends and McNemar's p as row cells ``<key>_lo``, ``_hi``, ``_p``."""
    ci = ci or {}
    return {f"{key}_lo": ci.get("lo"), f"{key}_hi": ci.get("hi"), f"{key}_p": ci.get("mcnemar_p")}


def _method_row(ckpt: str, s: Dict[str, Any]) -> Dict[str, Any]:
    ref, held = s["reference"], s["heldout"]
    return _row(
        ckpt, s["method"], None, ref, held["folds"],
        **_ci(ref.get("gain_ci"), "reference_gain"),
        heldout_mean_gain=held["mean_gain"], **_ci(held["mean_gain_ci"], "heldout_mean_gain"),
        beyond_recalibration_mean=held["mean_beyond_recalibration"],
        **_ci(held["mean_beyond_recalibration_ci"], "beyond_recalibration_mean"),
        vs_recalibrated_baseline_mean=held["mean_vs_recalibrated_baseline"],
        masked_recalibrated_mean=held["mean_masked_recalibrated"],
        reference_at_fixed_k=ref["at_fixed_k"], reference_at_fixed_k_sd=None,
        heldout_at_fixed_k_mean=held["mean_at_fixed_k"],
    )  # fmt: skip


def _random_row(ckpt: str, r: Dict[str, Any]) -> Dict[str, Any]:
    return _row(
        ckpt, RANDOM, r["draws"], r["reference"] or {"baseline": r["baseline"]}, r["folds"],
        **_ci(None, "reference_gain"),
        heldout_mean_gain=r["mean_gain"], **_ci(None, "heldout_mean_gain"),
        beyond_recalibration_mean=r["mean_beyond_recalibration"],
        **_ci(None, "beyond_recalibration_mean"),
        vs_recalibrated_baseline_mean=r["mean_vs_recalibrated_baseline"],
        masked_recalibrated_mean=r["mean_masked_recalibrated"],
        reference_at_fixed_k=pick(r["fixed"], "mean"), reference_at_fixed_k_sd=pick(r["fixed"], "sd"),
        heldout_at_fixed_k_mean=r["fixed_heldout"],
    )  # fmt: skip


def protocol_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint: one row per method with a held-out record, then the random-k control.

    ``solve``: what an influence method's all-rows solve computed (`solve_label`).
    """
    rows = []
    solver = run.config.get("solver") or "minres"
    for ckpt in run.checkpoints:
        for m in protocol_methods(ckpt):
            row = _method_row(ckpt.name, method_summary(ckpt.heldouts[m], split=ckpt.split))
            row["solve"] = solve_label(m, ckpt.scores_info.get(m), solver)
            rows.append(row)
        if RANDOM in ckpt.heldouts:
            rows.append({**_random_row(ckpt.name, random_control(ckpt.heldouts[RANDOM])),
                         "solve": None})  # fmt: skip
    return rows


PROTOCOL_HEADERS = (
    "checkpoint", "method", "baseline (all rows)",
    "reference: best k", "reference: accuracy", "reference: gain",
    "A→B: best k", "A→B: accuracy on B", "A→B: gain",
    "B→A: best k", "B→A: accuracy on A", "B→A: gain",
    "held-out gain (mean) [95 % CI]", "beyond recalibration (mean) [95 % CI]",
    "masked + recalibrated (mean)",
    f"k = {FIXED_K:,}: reference", f"k = {FIXED_K:,}: held-out (mean)",
)  # fmt: skip


def _method_label(row: Dict[str, Any]) -> str:
    """The method, and its solve when that stopped short of its tolerance (named, not hidden)."""
    if row["method"] == RANDOM:
        return f"random-k ({row['draws']} draws)"
    solve = row.get("solve")
    if solve and "stopped short" in solve:
        return f"{row['method']} ({solve})"
    return row["method"]


def _gain_cell(row: Dict[str, Any], key: str, value: Any) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return fmt_gain_ci(value, None if lo is None else {"lo": lo, "hi": hi})


def protocol_table(run: Run) -> str:
    """Markdown: the reference protocol beside each held-out fold ("" without records)."""
    rows = protocol_rows(run)
    if not rows:
        return ""
    body = []
    for r in rows:
        cells = [r["checkpoint"], _method_label(r), fmt_accuracy(r["baseline"]),
                 fmt_k(r["reference_best_k"]),
                 fmt_pm(r["reference_accuracy"], r["reference_accuracy_sd"]),
                 _gain_cell(r, "reference_gain", r["reference_gain"])]  # fmt: skip
        for key in ("ab", "ba"):
            acc = fmt_pm(r[f"{key}_accuracy"], r[f"{key}_accuracy_sd"])
            cells += [fmt_k(r[f"{key}_best_k"]), acc, fmt_gain(r[f"{key}_gain"])]
        cells += [_gain_cell(r, "heldout_mean_gain", r["heldout_mean_gain"]),
                  _gain_cell(r, "beyond_recalibration_mean", r["beyond_recalibration_mean"]),
                  fmt_accuracy(r["masked_recalibrated_mean"]),
                  fmt_pm(r["reference_at_fixed_k"], r["reference_at_fixed_k_sd"]),
                  fmt_accuracy(r["heldout_at_fixed_k_mean"])]  # fmt: skip
        body.append(cells)
    return markdown_table(PROTOCOL_HEADERS, body, left=2)


# --------------------------------------------------------------------------- controls


def _control(ckpt: str, method: str, protocol: str, fold: Dict[str, Any], **kw) -> Dict[str, Any]:
    before, after = fold.get("share_before"), fold.get("share_after")
    return {
        "checkpoint": ckpt, "method": method, "protocol": protocol,
        "best_k": fold.get("best_k"), "unmasked": fold.get("baseline"),
        "recalibrated": fold.get("recalibrated"), "masked": fold.get("accuracy"),
        "masked_sd": kw.get("sd"), "masked_recalibrated": fold.get("masked_recalibrated"),
        "recal_best_k": fold.get("recal_best_k"),
        "beyond_recalibration": fold.get("beyond_recalibration"),
        "beyond_recalibration_lo": (fold.get("beyond_recalibration_ci") or {}).get("lo"),
        "beyond_recalibration_hi": (fold.get("beyond_recalibration_ci") or {}).get("hi"),
        "beyond_recalibration_p": (fold.get("beyond_recalibration_ci") or {}).get("mcnemar_p"),
        "vs_recalibrated_baseline": fold.get("vs_recalibrated_baseline"),
        "positive_before": positive_share(before), "positive_after": positive_share(after),
        "shares_before": before, "shares_after": after,
    }  # fmt: skip


def control_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint and method: the reference protocol and each fold, with the controls.

    The reference protocol has no recalibration control (its offset would be
    chosen on the rows it is measured on).
    """
    rows = []
    for ckpt in run.checkpoints:
        for m in protocol_methods(ckpt):
            s = method_summary(ckpt.heldouts[m], split=ckpt.split)
            rows.append(_control(ckpt.name, m, "reference", s["reference"]))
            for fold in s["heldout"]["folds"]:
                rows.append(_control(ckpt.name, m, fold["fold"], fold))
        if RANDOM in ckpt.heldouts:
            r = random_control(ckpt.heldouts[RANDOM])
            ref = r["reference"] or {"baseline": r["baseline"]}
            rows.append(_control(ckpt.name, RANDOM, "reference", ref, sd=ref.get("sd")))
            for fold in r["folds"]:
                rows.append(_control(ckpt.name, RANDOM, fold["fold"], fold, sd=fold.get("sd")))
    return rows


CONTROL_HEADERS = (
    "checkpoint", "method", "protocol", "best k", "unmasked", "recalibrated alone", "masked",
    "k chosen after recalibration", "masked + recalibrated", "beyond recalibration [95 % CI]",
    "masked − recalibrated unmasked (old column)", "positive share before",
    "positive share after",
)  # fmt: skip


def control_table(run: Run) -> str:
    """Markdown: recalibration alone and after masking, predicted-class balance ("" if none)."""
    rows = control_rows(run)
    if not rows:
        return ""
    body = []
    for r in rows:
        method = "random-k" if r["method"] == RANDOM else r["method"]
        protocol = "reference (all → all)" if r["protocol"] == "reference" else ARROW[r["protocol"]]
        recal = MISSING if r["protocol"] == "reference" else fmt_accuracy(r["recalibrated"])
        body.append([
            r["checkpoint"], method, protocol, fmt_k(r["best_k"]), fmt_accuracy(r["unmasked"]),
            recal, fmt_pm(r["masked"], r["masked_sd"]),
            fmt_k(r["recal_best_k"]) if r["protocol"] != "reference" else MISSING,
            fmt_accuracy(r["masked_recalibrated"]) if r["protocol"] != "reference" else MISSING,
            _gain_cell(r, "beyond_recalibration", r["beyond_recalibration"])
            if r["protocol"] != "reference" else MISSING,
            fmt_gain(r["vs_recalibrated_baseline"]) if r["protocol"] != "reference" else MISSING,
            fmt_positive(r["shares_before"]), fmt_positive(r["shares_after"]),
        ])  # fmt: skip
    return markdown_table(CONTROL_HEADERS, body, left=3)


def split_lines(run: Run) -> List[str]:
    """One line per checkpoint with a split: seed, half sizes, the start of their hashes."""
    lines = []
    for ckpt in run.checkpoints:
        split = ckpt.split
        if split is None:
            continue
        d = split.to_json()
        lines.append(
            f"- `{ckpt.name}`: split seed {split.seed}, A = {fmt_count(len(split.a))} rows "
            f"(sha256 {d['sha256_a'][:12]}…), B = {fmt_count(len(split.b))} rows "
            f"(sha256 {d['sha256_b'][:12]}…) of {fmt_count(split.n)}"
        )
    return lines


# --------------------------------------------------------------------------- fresh test set


def fresh_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint and method: dev-chosen masking measured once on the fresh rows."""
    rows = []
    for ckpt in run.checkpoints:
        for m in order_methods(ckpt.fresh):
            s = ckpt.fresh[m].summary(m)
            row: Dict[str, Any] = {
                "checkpoint": ckpt.name, "method": m, "rows": s["rows"],
                "unmasked": s["baseline"], "best_k": s["best_k"], "masked": s["accuracy"],
                "recal_best_k": s["recal_best_k"],
                "masked_recalibrated": s["masked_recalibrated"],
            }  # fmt: skip
            for key in ("gain", "recalibration_alone", "beyond_recalibration"):
                c = s[key]
                row.update({key: c["diff"], f"{key}_lo": c["lo"], f"{key}_hi": c["hi"],
                            f"{key}_p": c["mcnemar_p"]})  # fmt: skip
            rows.append(row)
    return rows


FRESH_HEADERS = (
    "checkpoint", "method", "fresh rows", "unmasked", "k (chosen on dev)", "masked",
    "gain [95 % CI]", "McNemar p", "recalibration alone [95 % CI]",
    "k after recalibration (dev)", "beyond recalibration [95 % CI]", "McNemar p",
)  # fmt: skip


def fresh_table(run: Run) -> str:
    """Markdown: the fresh test set ("" without records)."""
    rows = fresh_rows(run)
    if not rows:
        return ""
    body = [
        [r["checkpoint"], r["method"], fmt_count(r["rows"]), fmt_accuracy(r["unmasked"]),
         fmt_k(r["best_k"]), fmt_accuracy(r["masked"]), _gain_cell(r, "gain", r["gain"]),
         f"{r['gain_p']:.3g}",
         _gain_cell(r, "recalibration_alone", r["recalibration_alone"]), fmt_k(r["recal_best_k"]),
         _gain_cell(r, "beyond_recalibration", r["beyond_recalibration"]),
         f"{r['beyond_recalibration_p']:.3g}"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(FRESH_HEADERS, body, left=2)


# --------------------------------------------------------------------------- repeated splits


def _spread(values: List[Any]) -> Dict[str, Any]:
    ok = [v for v in values if v is not None]
    stats = mean_sd(ok)
    return {"mean": stats["mean"], "sd": stats["sd"], "min": min(ok) if ok else None,
            "max": max(ok) if ok else None}  # fmt: skip


def split_rows(run: Run) -> List[Dict[str, Any]]:
    """Per checkpoint and method: the held-out numbers over the split seeds (repeated
    cross-fitting): mean, split-to-split sd, range, and how many splits' paired intervals
    lie above or below 0."""
    rows = []
    for ckpt in run.checkpoints:
        rs = ckpt.splits
        if rs is None:
            continue
        for m in [*order_methods(set(rs.methods) - {RANDOM}), *([RANDOM] * (RANDOM in rs.methods))]:
            per = rs.methods[m]
            row: Dict[str, Any] = {"checkpoint": ckpt.name, "method": m,
                                   "seeds": [p["seed"] for p in per]}  # fmt: skip
            for key in ("gain", "beyond"):
                sp = _spread([p.get(key) for p in per])
                row.update({f"{key}_{k}": v for k, v in sp.items()})
                row[f"{key}_above"] = sum(1 for p in per if (p.get(f"{key}_lo") or 0) > 0)
                row[f"{key}_below"] = sum(1 for p in per if (p.get(f"{key}_hi") or 0) < 0)
            rows.append(row)
    return rows


SPLIT_HEADERS = (
    "checkpoint", "method", "splits", "held-out gain: mean ± sd over splits [range]",
    "splits with gain interval > 0 / < 0", "beyond recalibration: mean ± sd [range]",
    "splits with beyond-recalibration interval > 0 / < 0",
)  # fmt: skip


def _spread_cell(r: Dict[str, Any], key: str) -> str:
    if r[f"{key}_mean"] is None:
        return MISSING
    return (f"{fmt_pm_gain(r[f'{key}_mean'], r[f'{key}_sd'])} "
            f"[{fmt_gain(r[f'{key}_min'])}, {fmt_gain(r[f'{key}_max'])}]")  # fmt: skip


def split_table(run: Run) -> str:
    """Markdown: the held-out protocol over repeated splits ("" without them)."""
    rows = split_rows(run)
    if not rows:
        return ""
    body = [
        [r["checkpoint"], "random-k" if r["method"] == RANDOM else r["method"],
         ", ".join(str(s) for s in r["seeds"]), _spread_cell(r, "gain"),
         f"{r['gain_above']} / {r['gain_below']}", _spread_cell(r, "beyond"),
         f"{r['beyond_above']} / {r['beyond_below']}"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(SPLIT_HEADERS, body, left=2)
