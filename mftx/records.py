"""The run files' schema: every record `mftx analyze` writes and `mftx report` reads.

Each stage of an analysis writes one `StageRecord` file, in one layout::

    {"format": "mftx.<kind>/<version>", "state": "complete" | "partial",
     "settings": {...}, "inputs": {...}, "result": {...}}

``settings`` are the options the result depends on, ``inputs`` the
fingerprints (SHA-256) of what it was computed from (checkpoint weights, data
batches, scores), ``result`` the stage's payload: one of the record classes
below, registered for its kind with `register`. A record class has
``to_json()`` and ``from_json(reader)``; the writer (`mftx.analysis`) and the
readers (`mftx.report`) use the same classes, so a field is defined once.
`RunIndex` is the run directory's ``analysis.json``.

Paths in records are `Path` objects in memory and relative to the file's root
on disk (see `mftx.fileio`). Errors name the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

from . import fileio
from .fileio import FileFormatError

__all__ = [
    "ANALYSIS_FORMAT",
    "STATES",
    "Baseline",
    "CheckpointInfo",
    "Fidelity",
    "FidelitySample",
    "FidelityStats",
    "Overlap",
    "Reader",
    "RunIndex",
    "ScoresInfo",
    "StageRecord",
    "Sweep",
    "SweepPoint",
    "best_point",
    "kind_of",
    "read_stage",
    "register",
    "stage_kinds",
    "stem",
]

ANALYSIS_FORMAT = "mftx.analysis/2"
STATES = ("complete", "partial")
_REQUIRED = object()


# --------------------------------------------------------------------------- reading fields


class Reader:
    """One JSON object of a file with typed field access; errors name the file and field."""

    def __init__(self, obj: Any, path: Union[str, Path], where: str = "") -> None:
        self.file = path
        self.where = where
        if not isinstance(obj, dict):
            what = f"field {where!r}" if where else "the document"
            raise FileFormatError(path, f"{what} must be a JSON object, got {type(obj).__name__}")
        self.obj = obj

    def _name(self, key: Union[str, int]) -> str:
        return f"{self.where}.{key}" if self.where else str(key)

    def fail(self, key: Union[str, int], problem: str) -> FileFormatError:
        return FileFormatError(self.file, f"field {self._name(key)!r} {problem}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.obj:
            if default is _REQUIRED:
                where = f" in {self.where!r}" if self.where else ""
                raise FileFormatError(self.file, f"missing field {key!r}{where}")
            return default
        return self.obj[key]

    def int(self, key: str, default: Any = _REQUIRED) -> Optional[int]:
        """An integer (an integral float is accepted; booleans are not)."""
        value = self.raw(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise self.fail(key, f"must be an integer, got {value!r}")
        return int(value)

    def float(self, key: str, default: Any = _REQUIRED) -> float:
        """A number; null reads as NaN."""
        value = self.raw(key, default)
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def opt_float(self, key: str) -> Optional[float]:
        """A number, or None when the field is null or absent."""
        return None if self.raw(key, None) is None else self.float(key)

    def str(self, key: str, default: Any = _REQUIRED) -> Optional[str]:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {value!r}")
        return value

    def bool(self, key: str, default: Any = _REQUIRED) -> Optional[bool]:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = None) -> Optional[Path]:
        value = self.raw(key, default)
        if value is None or isinstance(value, Path):
            return value
        raise self.fail(key, f"must be a relative path ('./...' or '../...'), got {value!r}")

    def dict(self, key: str, default: Any = _REQUIRED) -> Dict[str, Any]:
        value = self.raw(key, default)
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a JSON object, got {type(value).__name__}")
        return value

    def list(self, key: str, default: Any = _REQUIRED) -> List[Any]:
        value = self.raw(key, default)
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {type(value).__name__}")
        return value

    def sub(self, key: str) -> Reader:
        return Reader(self.raw(key), self.file, self._name(key))

    def opt(self, key: str, cls: Any) -> Any:
        """``cls.from_json`` of the field, or None when it is null or absent."""
        return cls.from_json(self.sub(key)) if self.has(key) else None

    def each(self, key: str) -> List[Reader]:
        return [
            Reader(v, self.file, self._name(f"{key}[{i}]")) for i, v in enumerate(self.list(key))
        ]

    def mapping(self, key: str) -> Dict[str, Reader]:
        return {
            k: Reader(v, self.file, self._name(f"{key}.{k}")) for k, v in self.dict(key).items()
        }


# --------------------------------------------------------------------------- stage records

_KINDS: Dict[str, Tuple[int, Type[Any]]] = {}
_PER_METHOD: set = set()


def register(kind: str, version: int, per_method: bool = False) -> Callable[[Type[Any]], Type[Any]]:
    """Class decorator: `cls` is the result of stage `kind`, format ``mftx.<kind>/<version>``.

    A checkpoint has one file of a kind (``<kind>.json``) or, with
    `per_method`, one per method (``<kind>-<method>.json``).
    """

    def deco(cls: Type[Any]) -> Type[Any]:
        if kind in _KINDS or "-" in kind:
            raise ValueError(f"stage kind {kind!r} is registered twice or contains '-'")
        _KINDS[kind] = (version, cls)
        if per_method:
            _PER_METHOD.add(kind)
        cls.KIND = kind
        return cls

    return deco


def stage_kinds() -> Dict[str, str]:
    """Every registered stage kind and its current format string."""
    return {k: f"mftx.{k}/{v}" for k, (v, _) in _KINDS.items()}


def stem(kind: str, method: Optional[str] = None) -> str:
    """File name (without ``.json``) of a stage record: ``<kind>`` or ``<kind>-<method>``."""
    if kind not in _KINDS:
        raise ValueError(f"unknown stage kind {kind!r}")
    if (kind in _PER_METHOD) != (method is not None):
        raise ValueError(f"stage {kind!r} is {'per method' if kind in _PER_METHOD else 'single'}")
    return kind if method is None else f"{kind}-{method}"


def kind_of(name: str) -> Optional[str]:
    """The stage kind a file stem names (`stem`'s inverse), None for other files."""
    kind, sep, method = name.partition("-")
    if kind not in _KINDS or (kind in _PER_METHOD) != bool(sep and method):
        return None
    return kind


@dataclass
class StageRecord:
    """One stage's file: its settings, input fingerprints, state and result."""

    kind: str
    settings: Dict[str, Any]
    inputs: Dict[str, str]
    state: str
    result: Any

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown stage kind {self.kind!r}; one of {sorted(_KINDS)}")
        if self.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {self.state!r}")

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def format(self) -> str:
        return stage_kinds()[self.kind]

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": self.format,
            "state": self.state,
            "settings": self.settings,
            "inputs": self.inputs,
            "result": self.result.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any, path: Union[str, Path], kind: Optional[str] = None) -> StageRecord:
        r = Reader(obj, path)
        fmt = r.raw("format", None)
        if fmt is None:
            raise FileFormatError(
                path, "no 'format' field: written by an mftx without run records; rerun "
                "`mftx analyze --force` to recompute it",
            )  # fmt: skip
        name, _, version = str(fmt).removeprefix("mftx.").partition("/")
        if kind is not None and name != kind:
            raise FileFormatError(path, f"holds a {fmt!r} record, expected mftx.{kind}/...")
        if name not in _KINDS:
            raise FileFormatError(path, f"unknown record format {fmt!r}")
        want, result_cls = _KINDS[name]
        if version != str(want):
            raise FileFormatError(path, f"format is {fmt!r}, this mftx reads mftx.{name}/{want}")
        state = r.str("state")
        if state not in STATES:
            raise r.fail("state", f"must be one of {STATES}, got {state!r}")
        inputs = r.dict("inputs")
        if not all(isinstance(v, str) for v in inputs.values()):
            raise r.fail("inputs", "must map names to fingerprint strings")
        return cls(name, r.dict("settings"), inputs, state, result_cls.from_json(r.sub("result")))


def read_stage(path: Union[str, Path], kind: str, root: Union[str, Path]) -> StageRecord:
    """Read a stage file of `kind` (paths in it relative to `root`)."""
    return StageRecord.from_json(fileio.read_json(path, root), path, kind)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Baseline:
    """Dev accuracy and loss of the unmasked checkpoint (``n``: dev examples, if known)."""

    accuracy: float
    loss: float
    n: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n}

    @classmethod
    def from_json(cls, r: Reader) -> Baseline:
        return cls(r.float("accuracy"), r.float("loss", None), r.int("n", None))


@register("checkpoint", 1)
@dataclass
class CheckpointInfo:
    """The analysed checkpoint: where it is, its training metadata and baseline.

    ``metadata`` is the checkpoint's ``mftx.json``; ``data`` the provenance of
    the analysis data (source, seed, sizes, file digests).
    """

    name: str
    path: Optional[Path]
    target: Optional[float]
    baseline: Baseline
    total_params: Optional[int] = None
    analysed_params: Optional[int] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "target": self.target,
            "baseline": self.baseline.to_json(),
            "total_params": self.total_params,
            "analysed_params": self.analysed_params,
            "metadata": self.metadata,
            "data": self.data,
        }

    @classmethod
    def from_json(cls, r: Reader) -> CheckpointInfo:
        target = r.raw("target", None)
        return cls(
            name=r.str("name"),
            path=r.path("path"),
            target=None if target is None else r.float("target"),
            baseline=Baseline.from_json(r.sub("baseline")),
            total_params=r.int("total_params", None),
            analysed_params=r.int("analysed_params", None),
            metadata=r.dict("metadata", {}),
            data=r.dict("data", {}),
        )


@register("scores", 1, per_method=True)
@dataclass
class ScoresInfo:
    """A method's scores: the safetensors file, its fingerprint and how it was computed.

    The solver fields are None for methods without an inverse-HVP solve.
    """

    method: str
    file: str
    digest: str
    seconds: Optional[float] = None
    curvature: Optional[str] = None
    damping: Optional[float] = None
    hvp_batches_used: Optional[int] = None
    iterations: Optional[int] = None
    relative_residual: Optional[float] = None
    converged: Optional[bool] = None
    reason: Optional[str] = None
    n_hvp: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> ScoresInfo:
        return cls(
            method=r.str("method"),
            file=r.str("file"),
            digest=r.str("digest"),
            seconds=r.opt_float("seconds"),
            curvature=r.str("curvature", None),
            damping=r.opt_float("damping"),
            hvp_batches_used=r.int("hvp_batches_used", None),
            iterations=r.int("iterations", None),
            relative_residual=r.opt_float("relative_residual"),
            converged=r.bool("converged", None),
            reason=r.str("reason", None),
            n_hvp=r.int("n_hvp", None),
        )

    @property
    def solved(self) -> bool:
        return self.iterations is not None


@dataclass(frozen=True)
class SweepPoint:
    """One masking sweep point: the top-``k`` candidates masked (``removed`` of them exist)."""

    k: int
    removed: int
    accuracy: float
    loss: float
    n: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> SweepPoint:
        k = r.int("k")
        return cls(
            k, r.int("removed", k), r.float("accuracy"), r.float("loss", None), r.int("n", None)
        )


def best_point(points: List[SweepPoint]) -> Optional[SweepPoint]:
    """The point with the highest accuracy; a tie goes to the smallest ``k``.

    Points with a NaN accuracy are ignored; None when no point is left. The
    best point is returned whether or not it improves on the baseline.
    """
    valid = [p for p in points if not math.isnan(p.accuracy)]
    if not valid:
        return None
    return min(valid, key=lambda p: (-p.accuracy, p.k))


@register("sweep", 1, per_method=True)
@dataclass
class Sweep:
    """One method's masking sweep of one checkpoint, points sorted by ``k``.

    ``restored_bitwise``: the weights were checked bitwise equal afterwards
    (None while the sweep is partial).
    """

    method: str
    baseline: Optional[Baseline]
    points: List[SweepPoint]
    restored_bitwise: Optional[bool] = None

    def best(self) -> Optional[SweepPoint]:
        return best_point(self.points)

    def to_json(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "points": [p.to_json() for p in self.points],
            "restored_bitwise": self.restored_bitwise,
        }

    @classmethod
    def from_json(cls, r: Reader) -> Sweep:
        points = sorted((SweepPoint.from_json(p) for p in r.each("points")), key=lambda p: p.k)
        return cls(
            r.str("method"), r.opt("baseline", Baseline), points, r.bool("restored_bitwise", None)
        )


@register("overlap", 1, per_method=True)
@dataclass(frozen=True)
class Overlap:
    """Gradient-flagged count G, influence-beneficial count B, both, and |G \\ B| / |G|.

    The rate is NaN when G is 0.
    """

    gradient_flagged: int
    influence_beneficial: int
    both: int
    false_positive_rate: float
    analysed_params: Optional[int] = None
    influence_method: Optional[str] = None

    @classmethod
    def of_counts(cls, g: int, b: int, both: int, **kw: Any) -> Overlap:
        return cls(g, b, both, (g - both) / g if g else math.nan, **kw)

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> Overlap:
        return cls.of_counts(
            r.int("gradient_flagged"),
            r.int("influence_beneficial"),
            r.int("both"),
            analysed_params=r.int("analysed_params", None),
            influence_method=r.str("influence_method", None),
        )


@dataclass
class FidelitySample:
    """One parameter zeroed alone: the measured change of validation loss and predictions.

    ``actual`` is measured; ``origin`` (why it was sampled) and ``predicted``
    (each method's implied change) are derived from the scores on every run.
    """

    name: str
    tensor_index: int
    flat_index: int
    value: float
    actual: float
    origin: str = ""
    predicted: Dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> Tuple[int, int]:
        return self.tensor_index, self.flat_index

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, r: Reader) -> FidelitySample:
        pred = r.sub("predicted") if "predicted" in r.obj else None
        return cls(
            name=r.str("name"),
            tensor_index=r.int("tensor_index"),
            flat_index=r.int("flat_index"),
            value=r.float("value"),
            actual=r.float("actual"),
            origin=r.str("origin", ""),
            predicted={} if pred is None else {m: pred.float(m) for m in pred.obj},
        )


@dataclass(frozen=True)
class FidelityStats:
    """One method's agreement between predicted and actual loss changes.

    ``undefined``: statistic -> why it is NaN (e.g. a constant input).
    """

    method: str
    spearman: float
    pearson: float
    sign_agreement: float
    n: int
    undefined: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "method"}

    @classmethod
    def from_json(cls, r: Reader, method: str = "") -> FidelityStats:
        undefined = r.dict("undefined", {})
        return cls(
            method,
            r.float("spearman", None),
            r.float("pearson", None),
            r.float("sign_agreement", None),
            r.int("n", 0),
            {str(k): str(v) for k, v in undefined.items()},
        )


@register("fidelity", 1)
@dataclass
class Fidelity:
    """Predicted against actual loss changes of parameters zeroed one at a time.

    ``n_samples``: how many were asked for; ``samples``: those measured (all of
    them when the record is complete); ``summary``: per-method statistics over
    the samples (empty while partial).
    """

    dtype: str
    n_samples: int
    samples: List[FidelitySample]
    summary: Dict[str, FidelityStats] = field(default_factory=dict)
    base_loss: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "dtype": self.dtype,
            "n_samples": self.n_samples,
            "base_loss": self.base_loss,
            "samples": [s.to_json() for s in self.samples],
            "summary": {m: s.to_json() for m, s in self.summary.items()},
        }

    @classmethod
    def from_json(cls, r: Reader) -> Fidelity:
        summary = {m: FidelityStats.from_json(s, m) for m, s in r.mapping("summary").items()}
        samples = [FidelitySample.from_json(s) for s in r.each("samples")]
        return cls(r.str("dtype"), r.int("n_samples"), samples, summary, r.opt_float("base_loss"))


# --------------------------------------------------------------------------- the run index


@dataclass
class RunIndex:
    """``analysis.json``: the run's settings, command and checkpoints (directory names).

    ``command`` is the argument list, path arguments as `Path` (written
    relative to the run directory, so the command runs from there).
    """

    config: Dict[str, Any]
    checkpoints: List[str]
    command: List[Union[str, Path]] = field(default_factory=list)
    version: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": ANALYSIS_FORMAT,
            "mftx_version": self.version,
            "config": self.config,
            "command": self.command,
            "checkpoints": self.checkpoints,
        }

    @classmethod
    def from_json(cls, obj: Any, path: Union[str, Path]) -> RunIndex:
        r = Reader(obj, path)
        fmt = r.raw("format", None)
        if fmt != ANALYSIS_FORMAT:
            raise FileFormatError(path, f"format is {fmt!r}, expected {ANALYSIS_FORMAT!r}")
        names = r.list("checkpoints")
        if not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise r.fail("checkpoints", "must be a list of directory names")
        command = r.list("command", [])
        if not all(isinstance(c, (str, Path)) for c in command):
            raise r.fail("command", "must be a list of arguments")
        return cls(r.dict("config", {}), names, command, r.str("mftx_version", "") or "")
