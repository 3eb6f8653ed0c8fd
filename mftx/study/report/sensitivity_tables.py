"""Sensitivity of truncated solves: each truncation beside the next longer one.

From ``sensitivity-<family>.json`` (`mftx.study.sensitivity.Sensitivity`), each
member's scores record (its solve: iterations, residual) and held-out record
(gain and gain beyond recalibration, mean of the folds with paired bootstrap
intervals).
"""

from __future__ import annotations

from typing import Any, Dict, List

from .cells import fmt_gain_ci, solve_label
from .load import Run
from .summaries import method_summary
from .tables import MISSING, fmt_count, markdown_table

__all__ = ["sensitivity_rows", "sensitivity_table"]


def sensitivity_rows(run: Run) -> List[Dict[str, Any]]:
    """One row per checkpoint, family and member (long format)."""
    solver = run.config.get("solver") or "minres"
    rows = []
    for ckpt in run.checkpoints:
        for family, rec in sorted(ckpt.sensitivities.items()):
            nxt = {p["from"]: p for p in rec.pairs}
            settings = {m["label"]: m["setting"] for m in rec.members}
            ks = sorted({int(k) for p in rec.pairs for k in p["overlap"]})
            for m in rec.members:
                label = m["label"]
                info = ckpt.scores_info.get(label)
                row: Dict[str, Any] = {
                    "checkpoint": ckpt.name, "family": family, "parameter": rec.parameter,
                    "setting": m["setting"], "method": label,
                    "solve": solve_label(label, info, solver),
                    "iterations": None if info is None else info.iterations,
                    "relative_residual": None if info is None else info.relative_residual,
                    "curvature_products": None if info is None else info.n_hvp,
                }  # fmt: skip
                h = ckpt.heldouts.get(label)
                held = None if h is None else method_summary(h, split=ckpt.split)["heldout"]
                for key in ("gain", "beyond_recalibration"):
                    ci = None if held is None else held[f"mean_{key}_ci"] or {}
                    row[f"heldout_{key}"] = None if held is None else held[f"mean_{key}"]
                    row[f"heldout_{key}_lo"] = None if ci is None else ci.get("lo")
                    row[f"heldout_{key}_hi"] = None if ci is None else ci.get("hi")
                pair = nxt.get(label)
                row["next"] = None if pair is None else pair["to"]
                row["next_setting"] = None if pair is None else settings[pair["to"]]
                for k in ks:
                    row[f"overlap_top{k}"] = None if pair is None else pair["overlap"].get(str(k))
                row["relative_change"] = None if pair is None else pair["relative_change"]
                rows.append(row)
    return rows


def _ci(row: Dict[str, Any], key: str) -> str:
    x = row[key]
    if x is None:
        return MISSING
    return fmt_gain_ci(x, {"lo": row[f"{key}_lo"], "hi": row[f"{key}_hi"]})


def sensitivity_table(run: Run) -> str:
    """Markdown: per family member its solve, held-out gains, and how far the next longer
    setting moves its top-k and its scores ("" without sensitivity records)."""
    rows = sensitivity_rows(run)
    if not rows:
        return ""
    ks = sorted(
        {int(k[len("overlap_top") :]) for r in rows for k in r if k.startswith("overlap_top")}
    )
    headers = ["checkpoint", "method", "solve", "held-out gain", "beyond recalibration (fair)",
               "next setting", *[f"top-{k:,} shared with next" for k in ks],
               "‖I_next − I‖ / ‖I_next‖"]  # fmt: skip
    body = []
    for r in rows:
        nxt = r["next"]
        body.append([
            r["checkpoint"], r["method"], r["solve"] or MISSING, _ci(r, "heldout_gain"),
            _ci(r, "heldout_beyond_recalibration"),
            MISSING if nxt is None else _setting(r["next_setting"], r["parameter"]),
            *[MISSING if r.get(f"overlap_top{k}") is None else f"{r[f'overlap_top{k}']:.0%}"
              .replace("%", " %") for k in ks],
            MISSING if r["relative_change"] is None else f"{r['relative_change']:.2f}",
        ])  # fmt: skip
    return markdown_table(headers, body, left=2)


def _setting(value: int, parameter: str) -> str:
    return f"{fmt_count(value)} it." if parameter == "max_iter" else f"rank {value}"
