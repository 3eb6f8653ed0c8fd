"""The report's held-out sections: hand-made records with known answers; a tiny run end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict

import pytest
from test_cli import workspace  # noqa: F401  (fixture)
from test_report import (
    ANALYSED,
    PNG_MAGIC,
    checkpoint_rec,
    make_run,
    overlap_rec,
    rec,
    sweep_rec,
    table_rows,
)

from mftx.cli import main
from mftx.study import groups, protocol
from mftx.study.groups import GroupFidelity, GroupSample
from mftx.study.heldout import RowSplit
from mftx.study.location import Location
from mftx.study.protocol import Heldout, ProtocolPoint, RowStats, SplitInfo
from mftx.study.records import (
    Baseline,
    CheckpointInfo,
    Fidelity,
    FidelitySample,
    FidelityStats,
    ScoresInfo,
)
from mftx.study.report import (
    benchmark,
    byk_tables,
    format_tables,
    groupfid_tables,
    heldout_tables,
    load_results,
    load_run,
    location_tables,
    render_markdown,
    seeds,
    write_report,
)

# --------------------------------------------------------------------------- hand-made records


def _pt(scores, k, a, b, allrows, recal=(0.0, 0.0), shares=(0.5, 0.5), own=None):
    rows = {name: RowStats(acc, 0.5, list(shares), 10)
            for name, acc in (("all", allrows), ("A", a), ("B", b))}  # fmt: skip
    own = {} if own is None else {"A->B": own[0], "B->A": own[1]}
    return ProtocolPoint(scores, k, k, rows, {"A->B": recal[0], "B->A": recal[1]}, own)


# own: accuracy on the selection half after its own offset (A for A->B, B for B->A).
BASE = _pt("none", 0, 0.6, 0.6, 0.6, recal=(0.7, 0.65), shares=(0.2, 0.8), own=(0.7, 0.7))

# Taylor: all-row scores best at k = 10 on all rows (0.95); A-scores best on A at k = 100
# (0.8) where B is 0.55; B-scores best on B at k = 100 (0.63) where A is 0.64.
# After the selection half's own offset: A-scores best at k = 10 (0.78 on A; 0.72 on B
# recalibrated), B-scores at k = 100 (0.71 on B; 0.69 on A recalibrated).
TAYLOR = Heldout("taylor", BASE, [
    _pt("all", 10, 0.9, 0.9, 0.95, shares=(0.5, 0.5)), _pt("all", 100, 0.6, 0.6, 0.5),
    _pt("all", 5000, 0.5, 0.5, 0.52),
    _pt("A", 10, 0.7, 0.75, 0.7, recal=(0.72, 0.0), own=(0.78, 0.0)),
    _pt("A", 100, 0.8, 0.55, 0.7, recal=(0.66, 0.0), own=(0.75, 0.0)),
    _pt("A", 5000, 0.4, 0.45, 0.5, own=(0.5, 0.0)),
    _pt("B", 10, 0.61, 0.62, 0.6, own=(0.0, 0.6)),
    _pt("B", 100, 0.64, 0.63, 0.6, recal=(0.0, 0.69), own=(0.0, 0.71)),
    _pt("B", 5000, 0.42, 0.44, 0.5, own=(0.0, 0.4)),
], True)  # fmt: skip

# Random-k: two draws at k = 10 and 100. Means on A: 0.7 (k=10), 0.65; on B: 0.6, 0.6
# (tie -> k = 10); on all rows 0.6, 0.6 (tie -> k = 10).
RANDOM = Heldout("random", BASE, [
    _pt("draw0", 10, 0.6, 0.7, 0.6, recal=(0.66, 0.6)),
    _pt("draw1", 10, 0.8, 0.5, 0.6, recal=(0.7, 0.64)),
    _pt("draw0", 100, 0.65, 0.6, 0.7), _pt("draw1", 100, 0.65, 0.6, 0.5),
], True)  # fmt: skip

SPLIT = RowSplit((0, 2, 4), (1, 3, 5), 7, 6)


def heldout_files(name: str = "ckpt-60", base: float = 0.6) -> Dict[str, Any]:
    return {
        "checkpoint": checkpoint_rec(name, base),
        "sweep-taylor": sweep_rec("taylor", base, [(10, 10, 0.95, 0.4), (100, 100, 0.5, 0.6)]),
        "split": rec("split", SplitInfo(SPLIT)),
        "heldout-taylor": rec("heldout", TAYLOR),
        "heldout-random": rec("heldout", RANDOM),
    }


CONFIG = {"methods": ["taylor"], "heldout": True, "random_draws": 2, "fidelity_samples": 0}


@pytest.fixture
def heldout_run(tmp_path: Path):
    return load_run(make_run(tmp_path, {"ckpt-60": heldout_files()}, config=CONFIG))


def test_protocol_table_chooses_on_one_half_and_measures_on_the_other(heldout_run) -> None:
    assert heldout_run.incomplete() == []
    rows = table_rows(heldout_tables.protocol_table(heldout_run))
    assert len(rows[0]) == len(heldout_tables.PROTOCOL_HEADERS)
    assert rows[0] == [
        "ckpt-60", "taylor", "60.0 %",
        "10", "95.0 %", "+35.00",  # reference: best on all rows
        "100", "55.0 %", "-5.00",  # A→B: k from A (0.8), measured on B
        "100", "64.0 %", "+4.00",  # B→A
        # mean gain; beyond recalibration, k chosen after the selection half's own offset:
        # ((0.72 - 0.7) + (0.69 - 0.65)) / 2
        "-0.50", "+3.00",
        "70.5 %",  # masked + recalibrated: (0.72 + 0.69) / 2
        "52.0 %", "43.5 %",  # k = 5,000: all rows; mean of 0.45 (A-scores on B), 0.42
    ]  # fmt: skip
    sd = math.sqrt(((0.7 - 0.6) ** 2 + (0.5 - 0.6) ** 2) / 1)  # two draws, n - 1 = 1
    assert rows[1] == [
        "ckpt-60", "random-k (2 draws)", "60.0 %",
        "10", "60.0 ± 0.0 %", "0.00",
        "10", f"60.0 ± {100 * sd:.1f} %", "0.00",
        # B→A: on B the draws' means tie the unmasked model (0.6): k = 0 (no masking) wins.
        "0", "60.0 ± 0.0 %", "0.00",
        # beyond recalibration (records without recal_self: the same k): A→B
        # (0.66 + 0.7) / 2 - 0.7, B→A the unmasked model itself, 0.
        "0.00", "-1.00",
        "66.5 %",  # ((0.66 + 0.7) / 2 + 0.65) / 2
        "n/a", "n/a",
    ]  # fmt: skip
    # The rows hold the same numbers as fractions, for CSV and JSON.
    r = heldout_tables.protocol_rows(heldout_run)[0]
    assert r["ab_best_k"] == 100 and r["ab_accuracy"] == 0.55
    assert r["beyond_recalibration_mean"] == pytest.approx(0.03)
    assert r["vs_recalibrated_baseline_mean"] == pytest.approx(((0.55 - 0.7) + (0.64 - 0.65)) / 2)


def test_gain_at_every_k_by_hand(heldout_run) -> None:
    """Every k of the sweep, no k chosen: fold scores measured on the other half."""
    rows = table_rows(byk_tables.byk_table(heldout_run))
    assert rows == [
        # k = 10: all-row scores on all rows 0.95; A-scores on B 0.75, B-scores on A 0.61.
        # k = 100: 0.5; 0.55, 0.64.  k = 5,000: 0.52; 0.45, 0.42 (baseline 0.6 everywhere).
        ["ckpt-60", "taylor", "+35.00 / +8.00", "-10.00 / -0.50", "-8.00 / -16.50"],
        # Means over the two draws: k = 10 all 0.6, B 0.6, A 0.7; k = 100 all 0.6, B 0.6, A 0.65.
        ["ckpt-60", "random-k", "0.00 / +5.00", "0.00 / +2.50", "—"],
    ]
    r = byk_tables.byk_rows(heldout_run)[0]
    assert (r["k"], r["ab_gain"], r["ba_gain"]) == (10, pytest.approx(0.15), pytest.approx(0.01))
    assert set(byk_tables.BYK_FIELDS) <= set(r)


def test_controls_table(heldout_run) -> None:
    rows = table_rows(heldout_tables.control_table(heldout_run))
    assert rows[:3] == [
        ["ckpt-60", "taylor", "reference (all → all)", "10", "60.0 %", "—", "95.0 %", "—", "—",
         "—", "—", "80.0 %", "50.0 %"],
        # k chosen on A after A's offset (10): 0.72 recalibrated on B, +2.00 beyond the
        # recalibrated unmasked model; the old column: 0.55 unrecalibrated - 0.70.
        ["ckpt-60", "taylor", "A→B", "100", "60.0 %", "70.0 %", "55.0 %", "10", "72.0 %",
         "+2.00", "-15.00", "80.0 %", "50.0 %"],
        ["ckpt-60", "taylor", "B→A", "100", "60.0 %", "65.0 %", "64.0 %", "100", "69.0 %",
         "+4.00", "-1.00", "80.0 %", "50.0 %"],
    ]  # fmt: skip
    assert [r[2] for r in rows[3:]] == ["reference (all → all)", "A→B", "B→A"]
    assert rows[4][1] == "random-k" and rows[4][8] == "68.0 %"  # (0.66 + 0.7) / 2


def test_split_is_named_with_its_hashes(heldout_run) -> None:
    (line,) = heldout_tables.split_lines(heldout_run)
    sha_a = SPLIT.to_json()["sha256_a"]
    assert f"split seed 7, A = 3 rows (sha256 {sha_a[:12]}…)" in line


def test_heldout_problems_are_reported(tmp_path: Path) -> None:
    files = heldout_files()
    del files["split"], files["heldout-random"]
    files["heldout-taylor"] = rec("heldout", Heldout("taylor", BASE, TAYLOR.points[:2]), "partial")
    run = load_run(make_run(tmp_path, {"ckpt-60": files}, config=CONFIG))
    assert run.incomplete() == [
        "ckpt-60: heldout-taylor.json is partial (2 points so far)",
        "ckpt-60: split.json missing (the held-out rows are not recorded)",
        "ckpt-60: heldout-random.json missing (held-out protocol asked for)",
    ]


# --------------------------------------------------------------------------- group fidelity


def _groupfid() -> GroupFidelity:
    samples = []
    for k, actual in ((2, [0.1, 0.3, 0.2, 0.5]), (20, [1.0, 3.0, 2.0, 4.0])):
        for i, a in enumerate(actual):
            pred = {"taylor": 2 * a, "influence": -a}
            samples.append(GroupSample("random", k, f"r{k}{i}", a, pred, quadratic=a))
    samples.append(GroupSample("top-taylor", 2, "t", 0.2, {"taylor": 0.1, "influence": 0.3}))
    samples.append(GroupSample("flagged-influence", 2, "f", -0.5, {"taylor": 0.0, "influence": 1}))
    return GroupFidelity("B", 0.7, samples, groups.summarize(samples, resamples=50, seed=0))


def test_group_fidelity_tables(tmp_path: Path) -> None:
    files = {"checkpoint": checkpoint_rec("c", 0.6), "groupfid": rec("groupfid", _groupfid())}
    run = load_run(make_run(tmp_path, {"c": files}))
    rows = table_rows(groupfid_tables.group_correlation_table(run))
    # taylor predicts 2 × actual on random subsets: rank and linear correlation 1 (exactly,
    # so every bootstrap resample too); influence predicts -actual: -1.
    assert rows[0][:6] == ["c", "influence", "-1.000 [-1.000, -1.000]", "-1.000 [-1.000, -1.000]",
                           "-1.000 [-1.000, -1.000]", "-1.000 [-1.000, -1.000]"]  # fmt: skip
    assert rows[0][-1] == "8"
    assert rows[1][:3] == ["c", "taylor", "1.000 [1.000, 1.000]"]
    # taylor + quadratic: 2a + a = 3a, again perfectly correlated.
    assert rows[2][0:2] == ["c", "taylor + ½ θ_Sᵀ H θ_S"] and rows[2][4] == "1.000 [1.000, 1.000]"
    means = table_rows(groupfid_tables.group_mean_table(run))
    # influence, k = 2: random mean predicted -(0.1+0.3+0.2+0.5)/4, actual +0.275; its
    # flagged subset -0.5 (predicted 1); no top subset of influence.
    assert means[0] == ["c", "influence", "2", "-2.75e-01", "+2.75e-01", "—", "—",
                        "+1.00e+00", "-5.00e-01"]  # fmt: skip
    assert means[2] == ["c", "taylor", "2", "+5.50e-01", "+2.75e-01", "+1.00e-01", "+2.00e-01",
                        "—", "—"]  # fmt: skip
    assert [r[2] for r in means] == ["2", "20", "2", "20"]


def test_group_fidelity_directions_table(tmp_path: Path) -> None:
    # Measured on both halves: taylor's A scores predict A's change exactly (in-sample
    # A→A = +1), B's scores predict B (+1), the all-rows scores predict the opposite of
    # the all-rows change (-1); across halves the actual change on B is reversed (-1).
    samples = []
    for i, a in enumerate([0.1, 0.3, 0.2, 0.5]):
        rows = {"A": a, "B": -a, "all": 2 * a}
        sets = {"B": {"taylor": -3 * a}, "all": {"taylor": -a}}
        samples.append(GroupSample("random", 5, f"r{i}", -a, {"taylor": a}, None, rows, sets))
    old = GroupSample("random", 50, "old", 0.1, {"taylor": 0.2})  # one half measured only
    samples.append(old)
    gf = GroupFidelity("A+B", 0.7, samples, groups.summarize(samples, resamples=50, seed=0))
    assert "random k=50 B→A" not in gf.summary["taylor"]
    files = {"checkpoint": checkpoint_rec("c", 0.6), "groupfid": rec("groupfid", gf)}
    run = load_run(make_run(tmp_path, {"c": files}))
    rows = table_rows(groupfid_tables.group_direction_table(run))
    one, minus = "1.000 [1.000, 1.000]", "-1.000 [-1.000, -1.000]"
    # columns: all, A→A, B→B, A→B, B→A
    assert rows == [["c", "taylor", "5", minus, one, one, minus, minus, "4"]]
    assert groupfid_tables.group_direction("random k=5 B→A") == "B→A"
    assert groupfid_tables.group_direction("random k=5") == "A→B"
    assert groupfid_tables.group_origin("random k=5 all") == ("random", 5)
    # A record measured on one half only has no direction table.
    files["groupfid"] = rec("groupfid", _groupfid())
    assert (
        groupfid_tables.group_direction_table(load_run(make_run(tmp_path / "b", {"c": files})))
        == ""
    )


# --------------------------------------------------------------------------- location


def _location() -> Location:
    totals = {
        "kind": {"query": 100, "ffn_in": 300},
        "layer": {"0": 200, "1": 200},
        "leaf": {"weight": 390, "bias": 10},
        "layer_kind": {"0/query": 50, "0/ffn_in": 150, "1/query": 50, "1/ffn_in": 150},
    }
    top = {
        "kind": {"query": 25, "ffn_in": 25},
        "layer": {"0": 50},
        "leaf": {"weight": 40, "bias": 10},
        "layer_kind": {"0/query": 25, "0/ffn_in": 25},
    }
    small = {"kind": {"query": 5}, "layer": {"1": 5}, "leaf": {"bias": 5},
             "layer_kind": {"1/query": 5}}  # fmt: skip
    return Location("gradient", {"top-5": small, "top-50": top, "flagged": totals}, totals)


def test_location_enrichment(tmp_path: Path) -> None:
    loc = _location()
    assert location_tables.shown_sets(loc) == ["top-50", "flagged"]
    files = {"checkpoint": checkpoint_rec("c", 0.6), "location-gradient": rec("location", loc)}
    run = load_run(make_run(tmp_path, {"c": files}))
    kinds = table_rows(location_tables.kind_table(run))
    # query: 25/50 of the set, 100/400 of the analysed entries -> 2.00×; ffn_in 0.5 / 0.75;
    # biases 10/50 over 10/400 -> 8.00×.
    assert kinds[0] == ["c", "gradient", "top-50", "50", "2.00× (50.0 %)", "0.67× (50.0 %)",
                        "0.82× (80.0 %)", "8.00× (20.0 %)"]  # fmt: skip
    assert kinds[1][2:5] == ["flagged", "400", "1.00× (25.0 %)"]  # the whole space: chance
    layers = table_rows(location_tables.layer_table(run))
    assert layers[0] == ["c", "gradient", "top-50", "2.00× (100.0 %)", "0.00× (0.0 %)"]
    rows_, kinds_, cells = location_tables.layer_kinds(loc, "top-50")
    assert (rows_, kinds_) == (["0", "1"], ["query", "ffn_in"])
    assert cells[("0", "query")] == pytest.approx(0.5 / 0.125)
    assert cells[("1", "ffn_in")] == 0.0


# --------------------------------------------------------------------------- benchmark


def test_benchmark_rows(tmp_path: Path) -> None:
    files = heldout_files()
    files["scores-influence"] = rec("scores", ScoresInfo(
        "influence", "s.safetensors", "f" * 64, 79.4, "hessian", 0.01, 16, 3, 0.5, False,
        "non-positive curvature", 4))  # fmt: skip
    files["scores-taylor"] = rec("scores", ScoresInfo("taylor", "t.safetensors", "e" * 64, 2.5))
    files["scores-taylor@A"] = rec("scores", ScoresInfo("taylor@A", "a.safetensors", "d" * 64))
    files["overlap-influence"] = overlap_rec(40, 100, 10)
    stats = {"taylor": FidelityStats("taylor", 0.9, 0.8, 0.7, 10)}
    # Single-parameter fidelity from the samples: on the random ones taylor ranks like the
    # actual change (Spearman 1), on its top candidates in reverse (-1); read apart.
    samples = [FidelitySample("w", 0, i, 0.1, a, "random", {"taylor": 2 * a})
               for i, a in enumerate((0.1, 0.4, 0.2, 0.3))]  # fmt: skip
    samples += [FidelitySample("w", 0, 10 + i, 0.1, a, "top-taylor", {"taylor": -a})
                for i, a in enumerate((0.1, 0.5, 0.3))]  # fmt: skip
    files["fidelity"] = rec("fidelity", Fidelity("float64", 7, samples, stats))
    run = load_run(make_run(tmp_path, {"ckpt-60": files}, config=CONFIG))
    assert benchmark.benchmark_methods(run.checkpoints[0]) == ["influence", "taylor"]
    rows = table_rows(benchmark.benchmark_table(run))
    assert len(rows[0]) == len(benchmark.BENCHMARK_HEADERS)
    # influence: scored and compared, never swept: gains not measured. Its flags against the
    # gradient rule's: G = 40, B = 100, both = 10 of ANALYSED entries (κ by hand).
    n = ANALYSED
    p_o = (10 + (n - 40 - 100 + 10)) / n
    p_e = (40 / n) * (100 / n) + (1 - 40 / n) * (1 - 100 / n)
    KAPPA = f"{(p_o - p_e) / (1 - p_e):.3f} (75.0 %; {100 * (1 - 100 / n):.1f} %)"
    # The solve is named by what it computed: a truncated MINRES iterate says so.
    assert rows[0] == ["ckpt-60", "influence", "hessian", "0.01",
                       "MINRES, 3 it., rel. residual 0.5, stopped short", "4", "79.4", "—", "—",
                       "—", "—", "—", "—", "—", "—", "—", KAPPA]  # fmt: skip
    assert rows[1] == ["ckpt-60", "taylor", "—", "—", "—", "—", "2.5", "1.000 [1.000, 1.000]",
                       "-1.000", "—", "10", "+35.00", "100 / 100", "-0.50", "-8.00", "-16.50",
                       "—"]  # fmt: skip
    # random-k: no scores; at k = 5,000 nothing was measured.
    assert rows[2][:2] == ["ckpt-60", "random-k"] and rows[2][5] == "0"
    assert rows[2][10:14] == ["10", "0.00", "10 / 0", "0.00"]  # B→A: no masking (k = 0) wins
    # Without held-out records there is no benchmark (the plain report stays as it was).
    del files["heldout-taylor"], files["heldout-random"], files["split"]
    plain = load_run(make_run(tmp_path / "plain", {"ckpt-60": files}))
    assert benchmark.benchmark_table(plain) == ""


# --------------------------------------------------------------------------- seeds


def _seed_ckpt(name: str, seed: int, target: float, d: float, e: float, f: float) -> dict:
    """A checkpoint whose gradient rule gains f (all rows), e (A→B) and d (B→A) at k = 10."""
    info = CheckpointInfo(name, None, target, Baseline(0.6, 0.6), metadata={"seed": seed})
    base = _pt("none", 0, 0.6, 0.6, 0.6, recal=(0.65, 0.62), own=(0.7, 0.7))
    # Recalibrated, masking keeps half its gain: e / 2 on B, d / 2 on A.
    point = _pt("all", 10, 0.6 + d, 0.6 + e, 0.6 + f, recal=(0.65 + e / 2, 0.62 + d / 2),
                own=(0.71, 0.71))  # fmt: skip
    h = Heldout("gradient", base, [point], True)
    return {"checkpoint": rec("checkpoint", info), "heldout-gradient": rec("heldout", h)}


def test_seeds_mean_and_sd_by_hand(tmp_path: Path) -> None:
    gains = [(0.01, 0.03, 0.05), (0.02, 0.02, 0.07), (0.03, 0.05, 0.09)]
    ckpts = {f"s{i}-60": _seed_ckpt(f"s{i}-60", i, 0.6, *g) for i, g in enumerate(gains)}
    ckpts["s0-75"] = _seed_ckpt("s0-75", 0, 0.75, 0.1, 0.1, 0.1)  # one seed: not grouped
    ckpts["s2-60"]["sweep-influence"] = sweep_rec("influence", 0.6, [(10, 10, 0.64, 0.5)])
    run = load_run(make_run(tmp_path, ckpts, config={"methods": ["gradient"]}))
    assert list(seeds.seed_groups(run)) == [0.6]

    def mean_sd(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    ref = mean_sd([f for _, _, f in gains])
    held = mean_sd([(d + e) / 2 for d, e, _ in gains])
    beyond = mean_sd([(e / 2 + d / 2) / 2 for d, e, _ in gains])
    infl, grad = seeds.seed_rows(run)  # table order: influence first
    assert grad["seeds"] == [0, 1, 2] and grad["reference_gain_n"] == 3
    assert (grad["reference_gain_mean"], grad["reference_gain_sd"]) == pytest.approx(ref)
    assert (grad["heldout_gain_mean"], grad["heldout_gain_sd"]) == pytest.approx(held)
    assert (grad["beyond_recalibration_mean"], grad["beyond_recalibration_sd"]) == pytest.approx(
        beyond
    )
    # 95 % Student-t interval over the three seeds: t_{0.975, 2} = 4.3027
    half = [4.302652729749464 * sd / math.sqrt(3) for _, sd in (ref, held, beyond)]
    assert (grad["heldout_gain_lo"], grad["heldout_gain_hi"]) == pytest.approx(
        (held[0] - half[1], held[0] + half[1])
    )

    def cell(m, h):
        return f"{100 * m[0]:+.2f} ± {100 * m[1]:.2f} [{100 * (m[0] - h):+.2f}, {100 * (m[0] + h):+.2f}]"

    rows = table_rows(seeds.seed_table(run))
    assert rows[1] == ["60.0 %", "gradient", "3", "0, 1, 2", cell(ref, half[0]),
                       cell(held, half[1]), cell(beyond, half[2])]  # fmt: skip
    # influence: swept at one of the three checkpoints only (no held-out record).
    assert infl["reference_gain_n"] == 1 and rows[0][4] == "+4.00 ± 0.00 (n = 1)"
    assert rows[0][5] == "n/a"


# --------------------------------------------------------------------------- report files


def test_report_files_and_rebuild_from_results_json(tmp_path: Path) -> None:
    files = heldout_files()
    files["groupfid"] = rec("groupfid", _groupfid())
    files["location-taylor"] = rec("location", _location())
    run_dir = make_run(tmp_path, {"ckpt-60": files}, config=CONFIG)
    out = write_report(run_dir)
    text = (out / "report.md").read_text()
    for heading in ("Masking: reference vs held-out protocol", "Controls: recalibration",
                    "Masking: gain at every k under both protocols",
                    "Group fidelity: zeroing whole subsets", "Methods benchmark",
                    "Where the removed parameters live"):  # fmt: skip
        assert f"## {heading}" in text, heading
    assert "Gains across fine-tuning seeds" not in text  # one checkpoint per target
    assert text.index("## Masking: reference") < text.index("## Overlap")
    for name in ("heldout", "groupfid", "location"):
        png = (out / f"{name}-ckpt-60.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 5_000, name
        assert f"![ckpt-60]({name}-ckpt-60.png)" in text
    with (out / "results-heldout.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["taylor", "random"]
    assert float(rows[0]["ab_accuracy"]) == 0.55 and rows[0]["reference_at_fixed_k"] == "0.52"
    assert rows[1]["draws"] == "2"
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["tables"]) == {"heldout", "byk", "controls", "groupfid", "benchmark", "location"}
    assert json.loads(rows[0]["ab_accuracy"]) == doc["tables"]["heldout"][0]["ab_accuracy"]
    # The CLI tables show the same sections.
    assert "## Masking: reference vs held-out protocol" in format_tables(load_run(run_dir))
    # Rebuilt from results.json alone: the same tables, CSVs and derived rows.
    again = write_report(out / "results.json", tmp_path / "again")
    body = [(d / "report.md").read_text().split("## Masking")[1:] for d in (out, again)]
    assert body[0] == body[1]
    for name in sorted(p.name for p in out.glob("results*.csv")):
        assert (again / name).read_text() == (out / name).read_text(), name
    assert json.loads((again / "results.json").read_text())["tables"] == doc["tables"]
    assert sorted(p.name for p in again.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))


def test_spectrum_section_reads_spectrum_records(tmp_path: Path) -> None:
    """The spectrum section shows any ``spectrum`` record (a Spectrum-like result)."""
    import types

    import torch

    from mftx.study.report import sections, spectrum_tables

    class FakeSpectrum:
        n, lambda_min, lambda_max, lambda_min_error, lambda_max_error = 100, -1.5, 4.25, 1e-3, 0
        trace, trace_std, trace_method, n_matvec, seconds = 12.0, 0.5, "hutchinson", 40, 3.21

        def density(self):
            grid = torch.linspace(-2, 5, 50, dtype=torch.float64)
            return grid, torch.exp(-(grid**2))

    run = load_run(make_run(tmp_path, {"c": {"checkpoint": checkpoint_rec("c", 0.6)}}))
    assert spectrum_tables.spectrum_table(run) == ""
    run.checkpoints[0].records["spectrum-ggn"] = types.SimpleNamespace(result=FakeSpectrum())
    rows = table_rows(spectrum_tables.spectrum_table(run))
    assert rows == [["c", "ggn", "-1.5 ± 1.0e-03", "4.25", "12 ± 5.0e-01 (hutchinson)", "40",
                     "3.2"]]  # fmt: skip
    parts = sections.section_parts(run, "solves", [tmp_path / "spectrum-c.png"])
    assert parts[0].startswith("## Curvature spectrum") and "![c](spectrum-c.png)" in parts[0]
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = spectrum_tables.spectrum_figure(run.checkpoints[0], Figure)
    FigureCanvasAgg(fig)
    fig.savefig(io.BytesIO(), format="png")  # renders without warnings (they are errors)


def test_plain_run_has_no_heldout_sections(tmp_path: Path) -> None:
    files = {"checkpoint": checkpoint_rec("c", 0.6),
             "sweep-gradient": sweep_rec("gradient", 0.6, [(10, 10, 0.61, 0.5)])}  # fmt: skip
    run_dir = make_run(tmp_path, {"c": files}, config={"methods": ["gradient"],
                                                       "fidelity_samples": 0})  # fmt: skip
    out = write_report(run_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy-all.png", "accuracy-c.png", "report.md", "results.csv", "results.json",
    ]  # fmt: skip
    assert "tables" not in json.loads((out / "results.json").read_text())
    text = render_markdown(load_run(run_dir), [], out)
    assert "held-out" not in text and "## Methods benchmark" not in text


# --------------------------------------------------------------------------- end to end

ANALYZE = (
    "--train-size", "16", "--batch-size", "8", "--ks", "5,50", "--methods",
    "gradient,taylor,influence", "--damping", "1.0", "--max-iter", "10",
    "--fidelity-samples", "3", "--heldout", "--split-seed", "1", "--random-draws", "2",
    "--group-subsets", "3", "--group-ks", "2,20", "--group-flagged", "1",
    "--group-quadratic", "1", "--location-ks", "5,40", "--no-progress",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(workspace):  # noqa: F811
    """`mftx analyze --heldout` of test_cli's tiny random-init BERT, then `mftx report`."""
    root, data, model = workspace
    out = root / "run"
    assert main(["analyze", str(model), "--data", str(data), *ANALYZE, "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    return out


def test_end_to_end_report_matches_the_records(tiny_run: Path) -> None:
    report = tiny_run / "report"
    text = (report / "report.md").read_text()
    assert "## Masking: reference vs held-out protocol" in text
    assert "## Group fidelity: zeroing whole subsets" in text
    run = load_run(tiny_run)
    for kind in ("heldout", "groupfid", "location"):
        assert (report / f"{kind}-{run.checkpoints[0].name}.png").read_bytes()[:8] == PNG_MAGIC
    ckpt = run.checkpoints[0]
    assert run.incomplete() == []
    assert sorted(ckpt.heldouts) == ["gradient", "influence", "random", "taylor"]
    # The table's held-out numbers are the protocol's summaries of the records.
    rows = {r["method"]: r for r in heldout_tables.protocol_rows(run)}
    for m in ("gradient", "influence", "taylor"):
        held = protocol.heldout_summary(ckpt.heldouts[m])
        assert rows[m]["heldout_mean_gain"] == held["mean_gain"]
        assert rows[m]["ab_accuracy"] == held["folds"][0]["accuracy"]
        # The reference column (held-out record, all rows) agrees with the plain sweep.
        sweep = {p.k: p.accuracy for p in ckpt.sweeps[m].points}
        curve = ckpt.heldouts[m].curve("all")
        assert {k: p.rows["all"].accuracy for k, p in curve.items()} == pytest.approx(sweep)
    assert rows["random"]["draws"] == 2
    # Benchmark: one row per method and the random-k control; influence's curvature products.
    bench = {r["method"]: r for r in benchmark.benchmark_rows(run)}
    assert list(bench) == ["influence", "gradient", "taylor", "random"]
    assert bench["influence"]["curvature_products"] == ckpt.scores_info["influence"].n_hvp
    assert bench["taylor"]["group_spearman"] is not None
    # Location rows count the largest top-k set (40 entries) and add up to it.
    loc = [r for r in location_tables.location_rows(run)
           if (r["method"], r["table"], r["set"]) == ("taylor", "kind", "top-40")]  # fmt: skip
    assert sum(r["count"] for r in loc) == 40
    # results.json rebuilds the same report.
    again = write_report(report / "results.json", tiny_run / "again")
    assert (again / "report.md").read_text().split("## Masking")[1:] == text.split("## Masking")[1:]
    assert load_results(report / "results.json").checkpoints[0].split == ckpt.split


def test_flag_precision_against_measured_zeroing_by_hand(tmp_path: Path) -> None:
    # Random samples: taylor flags (predicts < 0) three, two of which zeroing did help.
    samples = [FidelitySample("w", 0, i, 0.1, a, "random", {"taylor": p})
               for i, (a, p) in enumerate(((-0.1, -1.0), (-0.2, -2.0), (0.3, -0.5),
                                           (0.1, 1.0), (-0.4, 2.0)))]  # fmt: skip
    samples.append(FidelitySample("w", 0, 9, 0.1, 0.5, "top-taylor", {"taylor": -9.0}))
    files = heldout_files()
    stats = {"taylor": FidelityStats("taylor", 0.0, 0.0, 0.0, 6)}
    files["fidelity"] = rec("fidelity", Fidelity("float64", 6, samples, stats))
    run = load_run(make_run(tmp_path, {"ckpt-60": files}, config=CONFIG))
    (row,) = benchmark.flag_rows(run)
    assert (row["random_samples"], row["flagged"], row["helped"]) == (5, 3, 2)  # top ones out
    assert row["precision"] == pytest.approx(2 / 3) and row["base_rate"] == pytest.approx(3 / 5)
    assert (row["precision_lo"], row["precision_hi"]) == pytest.approx(benchmark.wilson(2, 3))
    z2 = 1.959963984540054**2
    assert benchmark.wilson(15, 15)[0] == pytest.approx(15 / (15 + z2))  # all hits: n / (n + z²)
    assert math.isnan(benchmark.wilson(0, 0)[0])
