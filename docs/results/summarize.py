"""The README's Results tables, condensed from the CSVs `mftx report` wrote here.

    python docs/results/summarize.py [REPORT_DIR] > docs/results/summary.md

REPORT_DIR defaults to this file's directory. Every number in the README's
Results tables is a line of ``summary.md`` (tests/test_report.py checks it), and
``summary.md`` is this script's output on the committed CSVs (checked too).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

#: Sweep points shown in the gain-against-k table (the study's "past 500 removals" claim).
BYK_KS = ("100", "500", "1000", "5000", "10000")
#: Checkpoints of the gain-against-k table: unmasked dev accuracy at or above this.
BYK_MIN_BASELINE = 0.7


def _rows(d: Path, name: str) -> List[Dict[str, str]]:
    p = d / name
    if not p.is_file():
        return []
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


def _pts(x: Optional[Union[str, float]]) -> str:
    """A fraction (a CSV cell or a number) as signed accuracy points, one decimal ("—" when empty)."""
    return "—" if x in (None, "") else f"{float(x) * 100:+.1f}"


def _pm(row: Dict[str, str], key: str) -> str:
    """Mean ± sd across seeds, with the 95 % t-interval where the CSV has one."""
    if not row[f"{key}_sd"]:
        return _pts(row[f"{key}_mean"])
    text = f"{float(row[key + '_mean']) * 100:+.1f} ± {float(row[key + '_sd']) * 100:.1f}"
    if row.get(f"{key}_lo"):
        text += f" [{_pts(row[key + '_lo'])}, {_pts(row[key + '_hi'])}]"
    return text


def _table(headers: List[str], align: str, body: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align.split()) + " |"]
    return out + ["| " + " | ".join(r) + " |" for r in body]


def _method(r: Dict[str, str]) -> str:
    """The method, with its solve named when it stopped short of its tolerance."""
    solve = r.get("solve") or ""
    return f"{r['method']} ({solve})" if "stopped short" in solve else r["method"]


def headline(d: Path) -> List[str]:
    """Per checkpoint and method: both protocols, the recalibration control, class balance."""
    ctrl: Dict[tuple, List[Dict[str, str]]] = {}
    for r in _rows(d, "results-controls.csv"):
        ctrl.setdefault((r["checkpoint"], r["method"]), []).append(r)
    body = []
    for r in _rows(d, "results-heldout.csv"):
        held = [x for x in ctrl.get((r["checkpoint"], r["method"]), [])
                if x["protocol"] != "reference"]  # fmt: skip
        recal = [float(x["recalibrated"]) - float(x["unmasked"]) for x in held if x["recalibrated"]]
        pos = " / ".join(
            f"{float(x['positive_before']) * 100:.0f} → {float(x['positive_after']) * 100:.0f} %"
            for x in held
            if x["positive_after"]
        )
        body.append([
            r["checkpoint"], f"{float(r['baseline']) * 100:.1f} %",
            _pts(sum(recal) / len(recal)) if recal else "—", _method(r),
            _pts(r["reference_gain"]),
            f"{_pts(r['heldout_mean_gain'])} ({_pts(r['ab_gain'])} / {_pts(r['ba_gain'])})",
            _pts(r["beyond_recalibration_mean"]), pos or "—",
        ])  # fmt: skip
    headers = ["checkpoint", "baseline", "recalibration alone (held-out)", "method",
               "reference gain", "held-out gain (A→B / B→A)", "beyond recalibration",
               "positive share: before → after (held-out)"]  # fmt: skip
    return _table(headers, ":-- --: --: :-- --: --: --: --:", body)


def seeds(d: Path) -> List[str]:
    body = [
        [
            f"{float(r['target']) * 100:.0f} %",
            r["method"],
            ", ".join(_json_list(r["checkpoints"])),
            _pm(r, "reference_gain"),
            _pm(r, "heldout_gain"),
            _pm(r, "beyond_recalibration"),
        ]
        for r in _rows(d, "results-seeds.csv")
    ]
    headers = ["target", "method", "checkpoints", "reference gain ± sd [95 % CI]",
               "held-out gain ± sd [95 % CI]", "beyond recalibration ± sd [95 % CI]"]  # fmt: skip
    return _table(headers, "--: :-- :-- --: --: --:", body)


def _json_list(text: str) -> List[str]:
    """A JSON list of strings as the CSV holds it."""
    return [str(x) for x in json.loads(text)]


def by_k(d: Path) -> List[str]:
    """Reference / held-out gain at a few k for the later checkpoints."""
    base = {r["checkpoint"]: float(r["baseline"]) for r in _rows(d, "results-heldout.csv")}
    cells: Dict[tuple, Dict[str, str]] = {}
    for r in _rows(d, "results-byk.csv"):
        if base.get(r["checkpoint"], 0.0) < BYK_MIN_BASELINE:
            continue
        method = "random-k" if r["method"] == "random" else r["method"]
        cells.setdefault((r["checkpoint"], method), {})[r["k"]] = (
            f"{_pts(r['reference_gain'])} / {_pts(r['heldout_mean_gain'])}"
        )
    body = [[c, m, *(by.get(k, "—") for k in BYK_KS)] for (c, m), by in cells.items()]
    headers = ["checkpoint", "method", *(f"k = {int(k):,}" for k in BYK_KS)]
    return _table(headers, ":-- :-- " + " ".join("--:" for _ in BYK_KS), body)


def _num(x: str, fmt: str = "{:.2f}") -> str:
    return "—" if x in (None, "") else fmt.format(float(x))


def _kappa(r: Dict[str, str]) -> str:
    """Cohen's κ of the gradient rule's flags and the method's, with the share of the flagged
    that the method does not call beneficial beside what chance gives."""
    if r.get("kappa") in (None, ""):
        return "—"
    rate = _num(r["false_positive_rate"], "{:.0%}").replace("%", " %")
    chance = _num(r["chance_rate"], "{:.0%}").replace("%", " %")
    return f"{_num(r['kappa'])} ({rate}; {chance})"


def _single(r: Dict[str, str]) -> str:
    """Single-parameter Spearman on the random samples, with its bootstrap interval."""
    text = _num(r["single_spearman"])
    if r.get("single_spearman_lo") not in (None, ""):
        text += f" [{_num(r['single_spearman_lo'])}, {_num(r['single_spearman_hi'])}]"
    return text


def benchmark(d: Path) -> List[str]:
    """The methods benchmark: cost, fidelity and gains of every scoring variant."""
    body = []
    for r in _rows(d, "results-benchmark.csv"):
        group = _num(r["group_spearman"])
        if r["group_spearman_lo"] not in (None, ""):
            group += f" [{_num(r['group_spearman_lo'])}, {_num(r['group_spearman_hi'])}]"
        body.append([
            r["checkpoint"], "random-k" if r["method"] == "random" else r["method"],
            r.get("solve") or "—", _num(r["curvature_products"], "{:.0f}"), _num(r["seconds"], "{:.0f}"),
            _single(r), _num(r.get("single_top_spearman", "")), group, _pts(r["in_sample_gain"]),
            _pts(r["heldout_gain"]),
            f"{_pts(r['in_sample_gain_at_fixed_k'])} / {_pts(r['heldout_gain_at_fixed_k'])}",
            _kappa(r),
        ])  # fmt: skip
    headers = ["checkpoint", "method", "solve", "curvature products", "seconds",
               "single-parameter Spearman, random [95 % CI]", "the same, top candidates",
               "group Spearman, random subsets pooled over k [95 % CI]", "reference gain", "held-out gain",
               "gain at k = 5,000 (reference / held-out)",
               "gradient rule vs method: κ (share of G not in B; by chance)"]  # fmt: skip
    return _table(headers, ":-- :-- :-- --: --: --: --: --: --: --: --: --:", body)


def _ci(row: Dict[str, str], key: str) -> str:
    """A gain in accuracy points with its interval: ``+14.7 [+12.4, +17.0]``."""
    return f"{_pts(row[key])} [{_pts(row[key + '_lo'])}, {_pts(row[key + '_hi'])}]"


def fresh(d: Path) -> List[str]:
    """The fresh test set: every choice on dev, measured once on unused training rows."""
    body = [
        [r["checkpoint"], r["method"], f"{int(r['rows']):,}", f"{float(r['unmasked']) * 100:.1f} %",
         f"{int(r['best_k']):,}", _ci(r, "gain"), _ci(r, "recalibration_alone"),
         _ci(r, "beyond_recalibration")]
        for r in _rows(d, "results-fresh.csv")
    ]  # fmt: skip
    headers = ["checkpoint", "method", "fresh rows", "unmasked", "k (chosen on dev)",
               "gain [95 % CI]", "recalibration alone", "beyond recalibration"]  # fmt: skip
    return _table(headers, ":-- :-- --: --: --: --: --: --:", body)


def splits(d: Path) -> List[str]:
    """Repeated splits: the held-out numbers over split seeds (mean ± sd [range])."""

    def spread(r: Dict[str, str], key: str) -> str:
        return (f"{_pts(r[key + '_mean'])} ± {float(r[key + '_sd']) * 100:.1f} "
                f"[{_pts(r[key + '_min'])}, {_pts(r[key + '_max'])}]")  # fmt: skip

    body = [
        [r["checkpoint"], r["method"], str(len(_json_list_of(r["seeds"]))), spread(r, "gain"),
         spread(r, "beyond")]
        for r in _rows(d, "results-splits.csv")
        if len(_json_list_of(r["seeds"])) > 1
    ]  # fmt: skip
    headers = ["checkpoint", "method", "splits", "held-out gain: mean ± sd [range]",
               "beyond recalibration: mean ± sd [range]"]  # fmt: skip
    return _table(headers, ":-- :-- --: --: --:", body)


def _json_list_of(text: str) -> List[int]:
    return [int(x) for x in json.loads(text)]


def spectrum(d: Path) -> List[str]:
    body = [
        [
            r["checkpoint"],
            r["label"],
            f"{float(r['lambda_min']):.3g}",
            f"{float(r['lambda_max']):.3g}",
            f"{float(r['trace']):.0f} ± {float(r['trace_std'] or 0):.0f}",
            r["n_matvec"],
        ]
        for r in _rows(d, "results-spectrum.csv")
    ]
    headers = ["checkpoint", "curvature", "λ_min", "λ_max", "trace", "products"]
    return _table(headers, ":-- :-- --: --: --: --:", body)


def sensitivity(d: Path) -> List[str]:
    """One solve at several iteration caps: its residual, gains, and what the next changes."""
    rows = _rows(d, "results-sensitivity.csv")
    ks = sorted(
        {int(k[len("overlap_top") :]) for r in rows for k in r if k.startswith("overlap_top")}
    )
    body = []
    for r in rows:
        nxt = r["next_setting"]
        unit = " it." if r["parameter"] == "max_iter" else ""
        body.append([
            r["checkpoint"], r["method"], r["solve"], _ci(r, "heldout_gain"),
            _ci(r, "heldout_beyond_recalibration"), f"{int(nxt):,}{unit}" if nxt else "—",
            *[f"{float(r[f'overlap_top{k}']) * 100:.0f} %" if r[f"overlap_top{k}"] else "—" for k in ks],
            _num(r["relative_change"]),
        ])  # fmt: skip
    headers = ["checkpoint", "method", "solve", "held-out gain [95 % CI]",
               "beyond recalibration", "next setting", *[f"top-{k:,} kept by next" for k in ks],
               "‖I_next − I‖ / ‖I_next‖"]  # fmt: skip
    return _table(headers, " ".join([":-- :-- :--"] + ["--:"] * (len(headers) - 3)), body)


DIRECTIONS = ("all", "A→A", "B→B", "A→B", "B→A")


def group_directions(d: Path) -> List[str]:
    """Group fidelity per subset size, in-sample and across halves (Spearman [95 % CI])."""
    cells: Dict[tuple, Dict[str, str]] = {}
    for r in _rows(d, "results-groupfid.csv"):
        if r["origin"] == "random" and r["k"]:
            rho = _num(r["spearman"])
            if r["spearman_lo"]:
                rho += f" [{_num(r['spearman_lo'])}, {_num(r['spearman_hi'])}]"
            cells.setdefault((r["checkpoint"], r["method"], int(r["k"])), {})[r["direction"]] = rho
    body = [[c, m, f"{k:,}", *[got.get(x, "—") for x in DIRECTIONS]]
            for (c, m, k), got in cells.items() if len(got) > 1]  # fmt: skip
    headers = ["checkpoint", "method", "k", "in-sample, all rows", "in-sample A→A",
               "in-sample B→B", "across A→B", "across B→A"]  # fmt: skip
    return _table(headers, ":-- :-- --: --: --: --: --: --:", body)


def summary(d: Path) -> str:
    blocks = [
        "<!-- written by docs/results/summarize.py from this directory's CSVs -->",
        "## Both protocols, with the controls", "\n".join(headline(d)),
        "## Across fine-tuning seeds", "\n".join(seeds(d)),
        "## Gain at k removals, reference / held-out (checkpoints from 70 % baseline up)",
        "\n".join(by_k(d)),
        "## Curvature spectrum", "\n".join(spectrum(d)),
    ]  # fmt: skip
    if _rows(d, "results-splits.csv"):
        blocks += ["## Repeated splits", "\n".join(splits(d))]
    if _rows(d, "results-fresh.csv"):
        blocks += ["## Fresh test set (chosen on dev, measured once)", "\n".join(fresh(d))]
    if _rows(d, "results-sensitivity.csv"):
        blocks += ["## Longer solves", "\n".join(sensitivity(d))]
    if len(group_directions(d)) > 2:
        blocks += ["## Group fidelity, in-sample and across halves (Spearman per subset size)",
                   "\n".join(group_directions(d))]  # fmt: skip
    # The methods benchmark runs measure fidelity; the main runs do not (their block would be empty).
    if any(r["single_spearman"] for r in _rows(d, "results-benchmark.csv")):
        blocks += ["## Methods benchmark", "\n".join(benchmark(d))]
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    sys.stdout.write(summary(here))
