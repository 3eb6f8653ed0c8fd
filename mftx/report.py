"""Reports of an analysis run: tables, CSV/JSON of everything, and accuracy plots.

`mftx analyze --out RUN_DIR` writes one directory per checkpoint under RUN_DIR
(``checkpoint.json``, ``sweep-<method>.json``, ``overlap.json``,
``fidelity.json``) and an ``analysis.json`` index. `load_run` reads them into
dataclasses, `format_tables` renders the three tables (masking, overlap,
fidelity) as markdown, and `write_report` writes ``report.md``,
``results.csv``, ``results.json`` and PNG plots into ``RUN_DIR/report/``.

A checkpoint whose analysis is incomplete (a sweep, the overlap or the fidelity
file missing, a sweep without points) is reported as such; files that exist
but cannot be read (invalid JSON, a wrong format string, a missing or mistyped
field) raise `RunFormatError` naming the file.

`spearman` and `pearson` live here too: the analysis code uses them for the
fidelity summary, and the report only displays what it computed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ANALYSIS_FORMAT",
    "COMBINED_PLOT",
    "CSV_HEADER",
    "METHOD_ORDER",
    "REPORT_FORMAT",
    "Baseline",
    "Checkpoint",
    "Fidelity",
    "FidelityStats",
    "MaskingRow",
    "Overlap",
    "Run",
    "RunFormatError",
    "Sweep",
    "SweepPoint",
    "average_ranks",
    "best_point",
    "csv_rows",
    "fidelity_table",
    "format_tables",
    "load_run",
    "markdown_table",
    "masking_rows",
    "masking_table",
    "order_methods",
    "overlap_table",
    "overlap_variants_table",
    "pearson",
    "plot_name",
    "render_markdown",
    "run_to_dict",
    "solve_table",
    "spearman",
    "write_csv",
    "write_plots",
    "write_report",
]

logger = logging.getLogger(__name__)

ANALYSIS_FORMAT = "mftx.analysis/1"
REPORT_FORMAT = "mftx.report/1"
METHOD_ORDER = ("influence", "gradient", "taylor", "obd", "magnitude")
"""Order of methods in tables, CSV and plots; unknown methods follow, sorted by name."""

DEFAULT_METHODS = ("gradient", "influence")
"""Methods expected when ``analysis.json``'s config does not list any."""

PathLike = Union[str, Path]
NA = "n/a"
MISSING = "—"


# --------------------------------------------------------------------------- errors


class RunFormatError(ValueError):
    """A file of a run directory that exists but cannot be read; names the file."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Baseline:
    """Dev accuracy and loss of the unmasked checkpoint (``n``: dev examples, if known)."""

    accuracy: float
    loss: float
    n: Optional[int] = None


@dataclass(frozen=True)
class SweepPoint:
    """One masking sweep point: the top-``k`` candidates masked (``removed`` of them exist)."""

    k: int
    removed: int
    accuracy: float
    loss: float


@dataclass
class Sweep:
    """One method's masking sweep of one checkpoint, points sorted by ``k``."""

    method: str
    baseline: Optional[Baseline]
    points: List[SweepPoint]
    restored_bitwise: Optional[bool]

    def best(self) -> Optional[SweepPoint]:
        """The sweep point with the highest accuracy (see `best_point`)."""
        return best_point(self.points)


@dataclass(frozen=True)
class Overlap:
    """Gradient-flagged count G, influence-beneficial count B, both, and |G \\ B| / |G|."""

    gradient_flagged: int
    influence_beneficial: int
    both: int
    false_positive_rate: float
    analysed_params: Optional[int] = None
    influence_method: Optional[str] = None


@dataclass(frozen=True)
class FidelityStats:
    """One method's agreement between predicted and actual loss changes."""

    method: str
    spearman: float
    pearson: float
    sign_agreement: float
    n: int


@dataclass
class Fidelity:
    """Fidelity of the predicted loss changes: per-sample records and per-method summaries."""

    n_samples: int
    samples: List[Dict[str, Any]]
    summary: Dict[str, FidelityStats]


@dataclass
class Checkpoint:
    """Everything the analysis wrote for one checkpoint.

    Fields read from ``checkpoint.json`` are None when that file is missing;
    ``sweeps`` holds the sweeps found, ``overlap`` / ``fidelity`` are None when
    their file is missing, and ``problems`` lists what is missing or suspect.
    """

    name: str
    directory: Path
    path: Optional[str] = None
    target: Optional[float] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    baseline: Optional[Baseline] = None
    total_params: Optional[int] = None
    analysed_params: Optional[int] = None
    sweeps: Dict[str, Sweep] = field(default_factory=dict)
    solves: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    overlap: Optional[Overlap] = None
    #: Overlap of the gradient rule with the other influence variants (``overlap-<m>.json``).
    overlap_variants: Dict[str, Overlap] = field(default_factory=dict)
    fidelity: Optional[Fidelity] = None
    expected_methods: Tuple[str, ...] = ()
    problems: List[str] = field(default_factory=list)

    def methods(self) -> List[str]:
        """Expected and found methods, in table order."""
        return order_methods(set(self.expected_methods) | set(self.sweeps))

    def baseline_for(self, method: str) -> Optional[Baseline]:
        """The baseline a method's improvement is measured against.

        The checkpoint's baseline when ``checkpoint.json`` exists, otherwise the
        one recorded in the sweep file.
        """
        if self.baseline is not None:
            return self.baseline
        sweep = self.sweeps.get(method)
        return sweep.baseline if sweep is not None else None


@dataclass
class Run:
    """An analysis run directory: its command, config and checkpoints."""

    directory: Path
    format: str
    config: Dict[str, Any]
    command: str
    checkpoints: List[Checkpoint]
    problems: List[str] = field(default_factory=list)

    def incomplete(self) -> List[str]:
        """Everything missing or suspect in the run, one line each, checkpoint first."""
        lines = list(self.problems)
        for ckpt in self.checkpoints:
            lines.extend(f"{ckpt.name}: {p}" for p in ckpt.problems)
        return lines


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """Parse a JSON file; invalid JSON raises `RunFormatError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunFormatError(path, f"not UTF-8 text ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFormatError(
            path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _object(value: Any, path: Path, what: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise RunFormatError(path, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _get(obj: Mapping[str, Any], key: str, path: Path, what: str = "") -> Any:
    if key not in obj:
        where = f" in {what}" if what else ""
        raise RunFormatError(path, f"missing field {key!r}{where}")
    return obj[key]


def _int(value: Any, path: Path, key: str) -> int:
    """An integer field (an integral float is accepted; booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunFormatError(path, f"field {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise RunFormatError(path, f"field {key!r} must be an integer, got {value!r}")
    return int(value)


def _float(value: Any, path: Path, key: str) -> float:
    """A float field; JSON null and NaN both read as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunFormatError(path, f"field {key!r} must be a number, got {value!r}")
    return float(value)


def _opt_int(obj: Mapping[str, Any], key: str, path: Path) -> Optional[int]:
    value = obj.get(key)
    return None if value is None else _int(value, path, key)


def _opt_str(obj: Mapping[str, Any], key: str, path: Path) -> Optional[str]:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise RunFormatError(path, f"field {key!r} must be a string, got {value!r}")
    return value


def _parse_baseline(value: Any, path: Path) -> Baseline:
    obj = _object(value, path, "'baseline'")
    return Baseline(
        accuracy=_float(_get(obj, "accuracy", path, "baseline"), path, "baseline.accuracy"),
        loss=_float(obj.get("loss"), path, "baseline.loss"),
        n=_opt_int(obj, "n", path),
    )


def _parse_point(value: Any, path: Path, index: int) -> SweepPoint:
    obj = _object(value, path, f"points[{index}]")
    where = f"points[{index}]"
    k = _int(_get(obj, "k", path, where), path, f"{where}.k")
    removed = obj.get("removed", k)
    return SweepPoint(
        k=k,
        removed=_int(removed, path, f"{where}.removed"),
        accuracy=_float(_get(obj, "accuracy", path, where), path, f"{where}.accuracy"),
        loss=_float(obj.get("loss"), path, f"{where}.loss"),
    )


def _parse_sweep(path: Path, method: str) -> Sweep:
    obj = _object(_read_json(path), path, "the file")
    recorded = obj.get("method", method)
    if recorded != method:
        raise RunFormatError(path, f"records method {recorded!r}, file name says {method!r}")
    points_raw = _get(obj, "points", path)
    if not isinstance(points_raw, list):
        raise RunFormatError(path, "field 'points' must be a list")
    points = sorted((_parse_point(p, path, i) for i, p in enumerate(points_raw)), key=lambda p: p.k)
    baseline = obj.get("baseline")
    restored = obj.get("restored_bitwise")
    return Sweep(
        method=method,
        baseline=None if baseline is None else _parse_baseline(baseline, path),
        points=points,
        restored_bitwise=None if restored is None else bool(restored),
    )


def _parse_overlap(path: Path) -> Overlap:
    obj = _object(_read_json(path), path, "the file")
    g = _int(_get(obj, "gradient_flagged", path), path, "gradient_flagged")
    both = _int(_get(obj, "both", path), path, "both")
    fpr = _float(obj.get("false_positive_rate"), path, "false_positive_rate")
    if g > 0 and math.isnan(fpr):
        fpr = (g - both) / g
    return Overlap(
        gradient_flagged=g,
        influence_beneficial=_int(
            _get(obj, "influence_beneficial", path), path, "influence_beneficial"
        ),
        both=both,
        false_positive_rate=fpr,
        analysed_params=_opt_int(obj, "analysed_params", path),
        influence_method=_opt_str(obj, "influence_method", path),
    )


def _parse_fidelity(path: Path) -> Fidelity:
    obj = _object(_read_json(path), path, "the file")
    summary_raw = _object(_get(obj, "summary", path), path, "'summary'")
    summary: Dict[str, FidelityStats] = {}
    for method, stats in summary_raw.items():
        s = _object(stats, path, f"summary[{method!r}]")
        key = f"summary.{method}"
        summary[method] = FidelityStats(
            method=method,
            spearman=_float(s.get("spearman"), path, f"{key}.spearman"),
            pearson=_float(s.get("pearson"), path, f"{key}.pearson"),
            sign_agreement=_float(s.get("sign_agreement"), path, f"{key}.sign_agreement"),
            n=_int(s.get("n", 0), path, f"{key}.n"),
        )
    samples = obj.get("samples", [])
    if not isinstance(samples, list):
        raise RunFormatError(path, "field 'samples' must be a list")
    n_samples = obj.get("n_samples", len(samples))
    return Fidelity(n_samples=_int(n_samples, path, "n_samples"), samples=samples, summary=summary)


def _parse_checkpoint_json(ckpt: Checkpoint, path: Path) -> None:
    obj = _object(_read_json(path), path, "the file")
    ckpt.path = obj.get("path")
    target = obj.get("target")
    ckpt.target = None if target is None else _float(target, path, "target")
    metadata = obj.get("metadata") or {}
    ckpt.metadata = _object(metadata, path, "'metadata'")
    ckpt.baseline = _parse_baseline(_get(obj, "baseline", path), path)
    ckpt.total_params = _opt_int(obj, "total_params", path)
    ckpt.analysed_params = _opt_int(obj, "analysed_params", path)


def _expected_methods(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """The methods the analysis was asked for (config ``methods``: list or comma string)."""
    methods = config.get("methods")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    if not isinstance(methods, (list, tuple)) or not methods:
        return DEFAULT_METHODS
    return tuple(str(m) for m in methods if str(m))


def _check_sweeps(ckpt: Checkpoint) -> None:
    """Record sweeps that are missing, empty, unrestored or disagree on the baseline."""
    for method in ckpt.methods():
        sweep = ckpt.sweeps.get(method)
        if sweep is None:
            ckpt.problems.append(f"sweep-{method}.json missing (no {method} masking sweep)")
            continue
        if not sweep.points:
            ckpt.problems.append(f"sweep-{method}.json has no points")
        if sweep.restored_bitwise is False:
            ckpt.problems.append(
                f"{method} sweep: weights were NOT restored bit for bit afterwards "
                "(later results of this checkpoint may be affected)"
            )
        if (
            ckpt.baseline is not None
            and sweep.baseline is not None
            and not math.isclose(sweep.baseline.accuracy, ckpt.baseline.accuracy, abs_tol=1e-9)
        ):
            ckpt.problems.append(
                f"{method} sweep baseline accuracy {sweep.baseline.accuracy!r} differs from "
                f"checkpoint.json's {ckpt.baseline.accuracy!r}"
            )


def _load_checkpoint(run_dir: Path, name: str, expected: Tuple[str, ...]) -> Checkpoint:
    """Read one checkpoint directory, recording (not raising on) missing files."""
    directory = run_dir / name
    ckpt = Checkpoint(name=name, directory=directory, expected_methods=expected)
    if not directory.is_dir():
        ckpt.problems.append(f"directory {directory} missing (no analysis results)")
        return ckpt
    info = directory / "checkpoint.json"
    if info.is_file():
        _parse_checkpoint_json(ckpt, info)
    else:
        ckpt.problems.append("checkpoint.json missing (no baseline or parameter counts)")
    for path in sorted(directory.glob("sweep-*.json")):
        method = path.stem[len("sweep-") :]
        ckpt.sweeps[method] = _parse_sweep(path, method)
    _check_sweeps(ckpt)
    for path in sorted(directory.glob("solve-*.json")):
        ckpt.solves[path.stem[len("solve-") :]] = _object(_read_json(path), path, "solve")
    overlap = directory / "overlap.json"
    if overlap.is_file():
        ckpt.overlap = _parse_overlap(overlap)
    elif {"gradient", "influence"} <= set(ckpt.methods()):
        ckpt.problems.append("overlap.json missing (no overlap table)")
    for path in sorted(directory.glob("overlap-*.json")):
        ckpt.overlap_variants[path.stem[len("overlap-") :]] = _parse_overlap(path)
    fidelity = directory / "fidelity.json"
    if fidelity.is_file():
        ckpt.fidelity = _parse_fidelity(fidelity)
    else:
        ckpt.problems.append("fidelity.json missing (no fidelity table)")
    return ckpt


def load_run(run_dir: PathLike) -> Run:
    """Read an analysis run directory written by ``mftx analyze --out RUN_DIR``.

    Raises FileNotFoundError when the directory or its ``analysis.json`` is
    missing, and `RunFormatError` (a ValueError naming the file) for invalid
    JSON, a format string other than ``mftx.analysis/1``, or a missing or
    mistyped field. Missing per-checkpoint files are not errors: they are
    listed by `Run.incomplete`.
    """
    run_dir = Path(run_dir)
    hint = "expected the output directory of `mftx analyze --out RUN_DIR`"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: {hint}")
    index = run_dir / "analysis.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: {hint}")
    obj = _object(_read_json(index), index, "the file")
    fmt = obj.get("format")
    if fmt != ANALYSIS_FORMAT:
        raise RunFormatError(index, f"format is {fmt!r}, expected {ANALYSIS_FORMAT!r}")
    config = _object(obj.get("config") or {}, index, "'config'")
    names = _get(obj, "checkpoints", index)
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise RunFormatError(index, "field 'checkpoints' must be a list of directory names")
    command = obj.get("command")
    if isinstance(command, list):
        command = " ".join(str(c) for c in command)
    expected = _expected_methods(config)
    run = Run(
        directory=run_dir,
        format=fmt,
        config=config,
        command=str(command) if command else "",
        checkpoints=[_load_checkpoint(run_dir, name, expected) for name in names],
    )
    if not names:
        run.problems.append("analysis.json lists no checkpoints")
    if not run.command:
        run.problems.append("analysis.json records no command")
    return run


# --------------------------------------------------------------------------- statistics


def _as_float_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _pair(x: Any, y: Any) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _as_float_array(x), _as_float_array(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    return a, b


def _pearson_arrays(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    if np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    if denom == 0.0:
        return math.nan
    return float(min(1.0, max(-1.0, float(np.dot(da, db)) / denom)))


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks (float64)."""
    a = _as_float_array(x)
    n = a.size
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    starts_mask = np.empty(n, dtype=bool)
    starts_mask[:1] = True
    starts_mask[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.append(starts[1:], n)
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two equal-length sequences (lists, numpy arrays or tensors).

    Returns NaN when either input is constant, has fewer than two values, or
    holds a non-finite value.
    """
    return _pearson_arrays(*_pair(x, y))


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share their mean rank).

    Returns NaN when either input is constant, has fewer than two values, or
    holds NaN; infinities rank as the extremes.
    """
    a, b = _pair(x, y)
    if a.size < 2 or np.any(np.isnan(a)) or np.any(np.isnan(b)):
        return math.nan
    return _pearson_arrays(average_ranks(a), average_ranks(b))


# --------------------------------------------------------------------------- tables


def order_methods(methods: Any) -> List[str]:
    """Methods in table order: influence, gradient, taylor, obd, magnitude, then others.

    Variants (``influence-ggn``) follow their base method.
    """

    def key(m: str):
        base = m.split("-", 1)[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (rank, m != base, m)

    return sorted(set(methods), key=key)


def best_point(points: Sequence[SweepPoint]) -> Optional[SweepPoint]:
    """The point with the highest accuracy; a tie goes to the smallest ``k``.

    Points with a NaN accuracy are ignored; None when no point is left. The
    best point is returned whether or not it improves on the baseline.
    """
    valid = [p for p in points if not math.isnan(p.accuracy)]
    if not valid:
        return None
    return min(valid, key=lambda p: (-p.accuracy, p.k))


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


def fmt_accuracy(x: Optional[float]) -> str:
    """An accuracy fraction as a percentage with one decimal: 0.6044 → ``60.4 %``."""
    if x is None or math.isnan(x):
        return NA
    return f"{100.0 * x:.1f} %"


def fmt_points(x: Optional[float]) -> str:
    """A signed difference in accuracy points with two decimals: ``+1.15``, ``-0.23``."""
    if x is None or math.isnan(x):
        return NA
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def fmt_share(x: Optional[float]) -> str:
    """A small percentage with at least four decimals and three significant digits."""
    if x is None or math.isnan(x):
        return NA
    if x == 0.0:
        return "0.0000 %"
    decimals = max(4, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f} %"


def fmt_count(n: Optional[int]) -> str:
    """An integer with thousands separators: 22713986 → ``22,713,986``."""
    return NA if n is None else f"{n:,}"


def fmt_rate(x: Optional[float]) -> str:
    """A fraction as a percentage with one decimal; NaN or None as ``n/a``."""
    if x is None or math.isnan(x):
        return NA
    return f"{100.0 * x:.1f} %"


def fmt_corr(x: Optional[float]) -> str:
    """A correlation with three decimals; NaN as ``n/a``."""
    if x is None or math.isnan(x):
        return NA
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
    "false-positive rate",
)


def overlap_table(run: Run) -> str:
    """Markdown overlap table; the false-positive rate is ``n/a`` when G is 0."""
    rows = []
    for ckpt in run.checkpoints:
        o = ckpt.overlap
        if o is None:
            rows.append([ckpt.name, "(missing)", MISSING, MISSING, MISSING])
            continue
        rows.append([ckpt.name, *_overlap_cells(o)])
    return markdown_table(OVERLAP_HEADERS, rows)


def _overlap_cells(o: Overlap) -> List[str]:
    """G, B, both and the false-positive rate (``n/a`` when G is 0), formatted."""
    fpr = o.false_positive_rate if o.gradient_flagged > 0 else None
    return [
        fmt_count(o.gradient_flagged),
        fmt_count(o.influence_beneficial),
        fmt_count(o.both),
        fmt_rate(fpr),
    ]


OVERLAP_VARIANT_HEADERS = (
    "checkpoint",
    "influence method",
    "gradient detrimental (G)",
    "influence beneficial (B)",
    "both",
    "false-positive rate",
)


def overlap_variants_table(run: Run) -> str:
    """The overlap table against the other influence variants ("" when there are none)."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.overlap_variants):
            rows.append([ckpt.name, method, *_overlap_cells(ckpt.overlap_variants[method])])
    return markdown_table(OVERLAP_VARIANT_HEADERS, rows, left=2) if rows else ""


SOLVE_HEADERS = (
    "checkpoint", "method", "curvature", "CG iterations", "relative residual", "stopped because",
    "seconds",
)  # fmt: skip


def solve_table(run: Run) -> str:
    """Markdown table of the inverse-HVP solves (methods without one are left out)."""
    rows = []
    for ckpt in run.checkpoints:
        for method in order_methods(ckpt.solves):
            s = ckpt.solves[method]
            if s.get("iterations") is None:
                continue
            res = s.get("relative_residual")
            rows.append(
                [
                    ckpt.name,
                    method,
                    str(s.get("curvature")),
                    fmt_count(int(s["iterations"])),
                    MISSING if res is None else f"{float(res):.2e}",
                    str(s.get("reason", "")),
                    MISSING if s.get("seconds") is None else f"{float(s['seconds']):.0f}",
                ]
            )
    if not rows:
        return "(no solves recorded)"
    return markdown_table(SOLVE_HEADERS, rows, left=3)


FIDELITY_HEADERS = ("checkpoint", "method", "Spearman", "Pearson", "sign agreement", "n")


def fidelity_table(run: Run) -> str:
    """Markdown fidelity table: correlations of predicted and actual loss changes."""
    rows = []
    for ckpt in run.checkpoints:
        if ckpt.fidelity is None:
            rows.append([ckpt.name, "(missing)", MISSING, MISSING, MISSING, MISSING])
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


def format_tables(run: Run) -> str:
    """The three tables with headings, and what is incomplete: for printing by the CLI."""
    parts = [
        "## Masking: best sweep point per checkpoint and method",
        masking_table(run),
        "## Overlap of gradient-flagged and influence-beneficial parameters",
        overlap_table(run),
    ]
    variants = overlap_variants_table(run)
    if variants:
        parts += ["## Overlap with the other influence variants", variants]
    parts += [
        "## Fidelity of predicted loss changes",
        fidelity_table(run),
        "## Inverse-HVP solves",
        solve_table(run),
    ]
    incomplete = run.incomplete()
    if incomplete:
        parts += ["## Incomplete", "\n".join(f"- {line}" for line in incomplete)]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- JSON and CSV


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _row_dict(row: MaskingRow) -> Dict[str, Any]:
    return {
        "method": row.method,
        "status": row.status,
        "baseline_accuracy": row.baseline_accuracy,
        "best": None if row.best is None else asdict(row.best),
        "improvement_points": row.improvement,
        "share_percent": row.share,
    }


def _best_fields(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: row[k] for k in ("best", "improvement_points", "share_percent")}


def run_to_dict(run: Run) -> Dict[str, Any]:
    """Everything in the run as one JSON-ready document (NaN written as null)."""
    best = {(r.checkpoint, r.method): _row_dict(r) for r in masking_rows(run)}
    checkpoints = []
    for ckpt in run.checkpoints:
        checkpoints.append(
            {
                "name": ckpt.name,
                "path": ckpt.path,
                "target": ckpt.target,
                "metadata": ckpt.metadata,
                "baseline": None if ckpt.baseline is None else asdict(ckpt.baseline),
                "total_params": ckpt.total_params,
                "analysed_params": ckpt.analysed_params,
                "sweeps": {
                    m: {**asdict(ckpt.sweeps[m]), **_best_fields(best[(ckpt.name, m)])}
                    for m in order_methods(ckpt.sweeps)
                },
                "masking": [best[(ckpt.name, m)] for m in ckpt.methods()],
                "overlap": None if ckpt.overlap is None else asdict(ckpt.overlap),
                "overlap_variants": {m: asdict(o) for m, o in ckpt.overlap_variants.items()},
                "fidelity": None if ckpt.fidelity is None else asdict(ckpt.fidelity),
                "problems": list(ckpt.problems),
            }
        )
    return _json_safe(
        {
            "format": REPORT_FORMAT,
            "analysis_format": run.format,
            "run_dir": str(run.directory),
            "command": run.command,
            "config": run.config,
            "checkpoints": checkpoints,
            "incomplete": run.incomplete(),
        }
    )


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


def write_csv(run: Run, path: Path) -> None:
    """Write `csv_rows` with `CSV_HEADER` to ``path``."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(csv_rows(run))


# --------------------------------------------------------------------------- plots


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "checkpoint"


def plot_name(checkpoint: str) -> str:
    """File name of a checkpoint's accuracy plot."""
    return f"accuracy-{_safe_name(checkpoint)}.png"


COMBINED_PLOT = "accuracy-all.png"


def _draw_checkpoint(ax: Any, ckpt: Checkpoint) -> None:
    """Accuracy (%) against k on a log axis, a line per method, the baseline dashed."""
    drawn = False
    for method in order_methods(ckpt.sweeps):
        pts = [p for p in ckpt.sweeps[method].points if p.k > 0 and not math.isnan(p.accuracy)]
        if pts:
            ax.plot([p.k for p in pts], [100 * p.accuracy for p in pts], marker="o", label=method)
            drawn = True
    base = ckpt.baseline_for(next(iter(order_methods(ckpt.sweeps)), ""))
    if base is not None and not math.isnan(base.accuracy):
        ax.axhline(100 * base.accuracy, linestyle="--", color="black", label="unmasked")
        title = f"{ckpt.name} (baseline {fmt_accuracy(base.accuracy)})"
    else:
        title = f"{ckpt.name} (baseline unknown)"
    if drawn:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no sweep results", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("parameters masked (k)")
    ax.set_ylabel("dev accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def write_plots(run: Run, out_dir: Path) -> Optional[List[Path]]:
    """Write one PNG per checkpoint and a combined figure; None if matplotlib is missing.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global
    backend switch), so it works headless and leaves an interactive session's
    backend alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        logger.warning("matplotlib is not installed (%s): skipping plots", exc)
        return None

    def save(fig: Any, path: Path) -> None:
        FigureCanvasAgg(fig)
        fig.savefig(path, dpi=100)

    paths = []
    for ckpt in run.checkpoints:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        _draw_checkpoint(fig.add_subplot(), ckpt)
        path = out_dir / plot_name(ckpt.name)
        save(fig, path)
        paths.append(path)
    if run.checkpoints:
        n = len(run.checkpoints)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
        for i, ckpt in enumerate(run.checkpoints):
            _draw_checkpoint(fig.add_subplot(rows, cols, i + 1), ckpt)
        path = out_dir / COMBINED_PLOT
        save(fig, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- report


def _checkpoint_lines(run: Run) -> List[str]:
    lines = []
    for c in run.checkpoints:
        target = "none" if c.target is None else fmt_accuracy(c.target)
        step = c.metadata.get("step", NA)
        lines.append(
            f"- `{c.name}`: target {target}, step {step}, baseline "
            f"{fmt_accuracy(None if c.baseline is None else c.baseline.accuracy)}, "
            f"{fmt_count(c.analysed_params)} of {fmt_count(c.total_params)} parameters analysed"
            + (f" — `{c.path}`" if c.path else "")
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


def render_markdown(run: Run, plots: Optional[List[Path]]) -> str:
    """The text of ``report.md`` (``plots`` None: plots were skipped)."""
    command = run.command or "(not recorded)"
    parts = [
        "# Mask fine-tuning report",
        f"Run directory: `{run.directory}`",
        f"Produced by:\n\n```\n{command}\n```",
        "## Checkpoints\n\n" + ("\n".join(_checkpoint_lines(run)) or "(none)"),
        "## Masking: best sweep point per checkpoint and method\n\n"
        "Best dev accuracy over the masking sweep's k grid (ties: the smallest k); "
        "improvement in accuracy points against the unmasked checkpoint, negative or zero "
        "when no k helped; share of model = parameters removed / all parameters.\n\n"
        + masking_table(run),
        "## Overlap of gradient-flagged and influence-beneficial parameters\n\n"
        "False-positive rate |G \\ B| / |G|: share of the gradient-flagged parameters (G) "
        "that influence does not call beneficial (B); n/a when G is 0.\n\n"
        + overlap_table(run)
        + _variants_section(run),
        "## Fidelity of predicted loss changes\n\n"
        "Predicted against actual change of validation loss when a sampled parameter "
        "alone is zeroed.\n\n" + fidelity_table(run),
        "## Inverse-HVP solves\n\n"
        "How each influence solve (H + λI) s = ∇L_val ended: CG stops at non-positive "
        "curvature, at the tolerance or at its iteration cap.\n\n" + solve_table(run),
        "## Accuracy against k\n\n" + "\n".join(_plot_lines(run, plots)),
    ]
    incomplete = run.incomplete()
    if plots is None:
        incomplete = [*incomplete, "plots: skipped, matplotlib is not installed"]
    body = "\n".join(f"- {line}" for line in incomplete) if incomplete else "Nothing missing."
    parts.append("## Incomplete\n\n" + body)
    return "\n\n".join(parts) + "\n"


def write_report(run_dir: PathLike, out_dir: Optional[PathLike] = None) -> Path:
    """Write report.md, results.csv, results.json and PNG plots; return the report directory.

    ``out_dir`` defaults to ``RUN_DIR/report``. Raises like `load_run`.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(run, out / "results.csv")
    doc = json.dumps(run_to_dict(run), indent=2, allow_nan=False)
    (out / "results.json").write_text(doc + "\n", encoding="utf-8")
    plots = write_plots(run, out)
    (out / "report.md").write_text(render_markdown(run, plots), encoding="utf-8")
    logger.info("report written to %s", out)
    return out
