"""The run files' records: what `mftx analyze` writes and `mftx report` reads, defined once.

One class per stage result, registered for its kind (`mftx.study.schema.register`):
`CheckpointInfo` (``checkpoint.json``), `ScoresInfo` (``scores-<method>.json``),
`Sweep` (``sweep-<method>.json``), `Overlap` (``overlap-<method>.json``),
`Fidelity` (``fidelity.json``), and the library's `Spectrum`
(``spectrum-<curvature>.json``); each is the ``result`` of a `StageRecord`.
`RunIndex` is the run directory's ``analysis.json``. The writer
(`mftx.study.analysis`) and the readers (`mftx.study.report`) use the same classes.

Paths are relative to the file's root on disk and absolute in memory (typed
fields such as `CheckpointInfo.path` as `Path`, paths inside free-form
metadata as strings; see `mftx.fileio`). Errors name the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..curvature.spectra import Spectrum
from ..fileio import FileFormatError
from .schema import Reader, StageRecord, kind_of, read_stage, register, stage_kinds, stem

__all__ = [
    "ANALYSIS_FORMAT",
    "Baseline",
    "CheckpointInfo",
    "Fidelity",
    "FidelitySample",
    "FidelityStats",
    "Overlap",
    "RunIndex",
    "ScoresInfo",
    "StageRecord",
    "Sweep",
    "SweepPoint",
    "best_point",
    "kind_of",
    "read_stage",
    "stage_kinds",
    "stem",
]

ANALYSIS_FORMAT = "mftx.analysis/2"

#: The spectrum stage's result (``spectrum-<curvature>.json``) is the library's `Spectrum`.
register("spectrum", 1, per_method=True)(Spectrum)


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

    The rate is NaN when G is 0; read it against `chance_rate` (what independent
    flags would give) and `kappa` (agreement beyond chance): it is not a
    false-positive rate, since influence is an approximation too.
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

    @property
    def chance_rate(self) -> float:
        """|G \\ B| / |G| if G were drawn independently of B: 1 - B / n (n analysed entries).

        With B about half of the parameters, chance is about 50 %: the rate alone
        does not say the two rules disagree. NaN without ``analysed_params``.
        """
        n = self.analysed_params
        return 1.0 - self.influence_beneficial / n if n else math.nan

    @property
    def kappa(self) -> float:
        """Cohen's κ of the two flags over the n analysed entries (0: chance agreement, 1: the
        same sets; negative: less agreement than chance). NaN without ``analysed_params`` or
        when a flag is constant."""
        n = self.analysed_params
        if not n:
            return math.nan
        g, b, both = self.gradient_flagged, self.influence_beneficial, self.both
        observed = (both + (n - g - b + both)) / n
        expected = (g / n) * (b / n) + (1 - g / n) * (1 - b / n)
        return (observed - expected) / (1 - expected) if expected < 1 else math.nan

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

    ``command`` is the argument list; path arguments (`Path` when written,
    absolute strings when read) are stored relative to the run directory, so
    the command runs from there.
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
            hint = (
                " (an older mftx wrote it: rerun `mftx analyze --force`)"
                if fmt == "mftx.analysis/1"
                else ""
            )
            raise FileFormatError(path, f"format is {fmt!r}, expected {ANALYSIS_FORMAT!r}{hint}")
        names = r.list("checkpoints")
        if not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise r.fail("checkpoints", "must be a list of directory names")
        command = r.list("command", [])
        if not all(isinstance(c, (str, Path)) for c in command):
            raise r.fail("command", "must be a list of arguments")
        return cls(r.dict("config", {}), names, command, r.str("mftx_version", "") or "")
