"""Reading an analysis run: from its directory (`load_run`) or its ``results.json`` (`load_results`).

A `Run` holds the run index and, per checkpoint, the stage records found
(`mftx.study.records`), keyed by file stem (``checkpoint``, ``scores-<method>``,
``sweep-<method>``, ``overlap-<method>``, ``fidelity``). What is missing or
suspect (a missing file, a partial stage, a sweep that did not restore the
weights) is listed in ``problems``, not raised; files that exist but cannot be
read raise `FileFormatError` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ... import fileio  # the last three register record kinds
from ...fileio import FileFormatError
from .. import fresh as fresh_test
from .. import groups, location, protocol, sensitivity  # these register record kinds
from ..records import CheckpointInfo, Fidelity, Overlap, RunIndex, ScoresInfo, Sweep
from ..schema import Reader, StageRecord, kind_of, read_stage

__all__ = ["METHOD_ORDER", "REPORT_FORMAT", "Checkpoint", "Run", "load_results", "load_run",
           "order_methods"]  # fmt: skip

REPORT_FORMAT = "mftx.report/2"
METHOD_ORDER = ("influence", "gradient", "taylor", "obd", "magnitude")
"""Order of methods in tables, CSV and plots; unknown methods follow, sorted by name."""

DEFAULT_METHODS = ("gradient", "influence")
"""Methods expected when the run's config does not list any."""

PathLike = Union[str, Path]


def order_methods(methods: Any) -> List[str]:
    """Methods in table order: influence, gradient, taylor, obd, magnitude, then others.

    Variants (``influence-ggn``) and fold scores (``influence@A``) follow their base method.
    """

    def key(m: str):
        base = m.split("@", 1)[0].split("-", 1)[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return (rank, m != base, m)

    return sorted(set(methods), key=key)


def _by_prefix(records: Mapping[str, StageRecord], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix) :]: r.result for k, r in records.items() if k.startswith(prefix)}


@dataclass
class Checkpoint:
    """Everything the analysis wrote for one checkpoint, and what is missing."""

    name: str
    records: Dict[str, StageRecord] = field(default_factory=dict)
    expected_methods: Tuple[str, ...] = ()
    problems: List[str] = field(default_factory=list)

    @property
    def info(self) -> Optional[CheckpointInfo]:
        rec = self.records.get("checkpoint")
        return None if rec is None else rec.result

    def _info(self, name: str, default: Any = None) -> Any:
        return default if self.info is None else getattr(self.info, name)

    baseline = property(lambda self: self._info("baseline"))
    path = property(lambda self: self._info("path"))
    target = property(lambda self: self._info("target"))
    total_params = property(lambda self: self._info("total_params"))
    analysed_params = property(lambda self: self._info("analysed_params"))
    metadata = property(lambda self: self._info("metadata", {}))

    @property
    def sweeps(self) -> Dict[str, Sweep]:
        return _by_prefix(self.records, "sweep-")

    @property
    def scores_info(self) -> Dict[str, ScoresInfo]:
        """How each method's scores were computed, by method (``<method>@A``: fold scores)."""
        return _by_prefix(self.records, "scores-")

    @property
    def solves(self) -> Dict[str, ScoresInfo]:
        """Methods whose scores came from an inverse-HVP solve, and how it ended."""
        return {m: s for m, s in self.scores_info.items() if s.solved}

    @property
    def overlaps(self) -> Dict[str, Overlap]:
        """Overlap of the gradient rule with each influence method, by influence method."""
        return _by_prefix(self.records, "overlap-")

    @property
    def primary_influence(self) -> Optional[str]:
        """The influence method of the main overlap table: plain influence when analysed."""
        found = order_methods(self.overlaps)
        return found[0] if found else None

    @property
    def overlap(self) -> Optional[Overlap]:
        p = self.primary_influence
        return None if p is None else self.overlaps[p]

    @property
    def overlap_variants(self) -> Dict[str, Overlap]:
        return {m: o for m, o in self.overlaps.items() if m != self.primary_influence}

    @property
    def fidelity(self) -> Optional[Fidelity]:
        rec = self.records.get("fidelity")
        return None if rec is None else rec.result

    @property
    def fresh(self) -> Dict[str, fresh_test.FreshTest]:
        """Per method: the fresh test set's record (``fresh-<method>.json``)."""
        return _by_prefix(self.records, "fresh-")

    @property
    def splits(self) -> Optional[protocol.RepeatedSplits]:
        """Each split seed's held-out numbers (``splits.json``; repeated cross-fitting)."""
        rec = self.records.get("splits")
        return None if rec is None else rec.result

    @property
    def sensitivities(self) -> Dict[str, sensitivity.Sensitivity]:
        """Per family of truncations of one solve (``sensitivity-<family>.json``)."""
        return _by_prefix(self.records, "sensitivity-")

    @property
    def heldouts(self) -> Dict[str, protocol.Heldout]:
        """Held-out protocol sweeps by method (``random``: the random-k control)."""
        return _by_prefix(self.records, "heldout-")

    @property
    def split(self) -> Optional[protocol.RowSplit]:
        rec = self.records.get("split")
        return None if rec is None else rec.result.split

    @property
    def group_fidelity(self) -> Optional[groups.GroupFidelity]:
        rec = self.records.get("groupfid")
        return None if rec is None else rec.result

    @property
    def locations(self) -> Dict[str, location.Location]:
        return _by_prefix(self.records, "location-")

    def methods(self) -> List[str]:
        """Expected and found methods, in table order."""
        return order_methods(set(self.expected_methods) | set(self.sweeps))

    def baseline_for(self, method: str):
        """The checkpoint's baseline, else the one recorded in the method's sweep."""
        if self.baseline is not None:
            return self.baseline
        sweep = self.sweeps.get(method)
        return sweep.baseline if sweep is not None else None

    def check(self, fidelity_expected: bool = True, heldout: Optional[Mapping] = None) -> None:
        """Append to ``problems`` what is missing, partial or suspect in the records.

        `heldout`: the run's config when it asked for the held-out protocol
        (its records are then expected), else None.
        """
        p = self.problems
        self._check_heldout(heldout)
        if self.info is None:
            p.append("checkpoint.json missing (no baseline or parameter counts)")
        for method in self.methods():
            rec = self.records.get(f"sweep-{method}")
            if rec is None:
                p.append(f"sweep-{method}.json missing (no {method} masking sweep)")
                continue
            sweep = rec.result
            if not sweep.points:
                p.append(f"sweep-{method}.json has no points")
            elif not rec.complete:
                done = ", ".join(str(pt.k) for pt in sweep.points)
                p.append(f"sweep-{method}.json is partial (k = {done} so far)")
            if sweep.restored_bitwise is False:
                p.append(
                    f"{method} sweep: weights were NOT restored bit for bit afterwards "
                    "(later results of this checkpoint may be affected)"
                )
            base = self.baseline
            if (
                base is not None
                and sweep.baseline is not None
                and not math.isclose(sweep.baseline.accuracy, base.accuracy, abs_tol=1e-9)
            ):
                p.append(
                    f"{method} sweep baseline accuracy {sweep.baseline.accuracy!r} differs from "
                    f"checkpoint.json's {base.accuracy!r}"
                )
        if "gradient" in self.methods():
            for m in self.methods():
                if m.split("-", 1)[0] == "influence" and m not in self.overlaps:
                    p.append(f"overlap-{m}.json missing (no overlap table for {m})")
        rec = self.records.get("fidelity")
        if rec is None and fidelity_expected:
            p.append("fidelity.json missing (no fidelity table)")
        elif rec is not None and not rec.complete:
            p.append(
                f"fidelity.json is partial ({len(rec.result.samples)} of "
                f"{rec.result.n_samples} samples measured)"
            )

    def _check_heldout(self, config: Optional[Mapping]) -> None:
        p = self.problems
        for stem in sorted(s for s in self.records if s.startswith("heldout-")):
            rec = self.records[stem]
            if not rec.complete:
                p.append(f"{stem}.json is partial ({len(rec.result.points)} points so far)")
            if rec.result.restored_bitwise is False:
                p.append(f"{stem}.json: weights were NOT restored bit for bit afterwards")
        if (self.heldouts or self.group_fidelity is not None) and self.split is None:
            p.append("split.json missing (the held-out rows are not recorded)")
        rec = self.records.get("groupfid")
        if rec is not None and not rec.complete:
            p.append(f"groupfid.json is partial ({len(rec.result.samples)} subsets measured)")
        if config is None:
            return
        want = [f"heldout-{m}" for m in self.expected_methods]
        if config.get("random_draws"):
            want.append("heldout-random")
        if config.get("group_subsets"):
            want.append("groupfid")
        for stem in want:
            if stem not in self.records:
                p.append(f"{stem}.json missing (held-out protocol asked for)")


@dataclass
class Run:
    """An analysis run: its index (config, command, checkpoints) and checkpoints' records."""

    directory: Optional[Path]
    index: RunIndex
    checkpoints: List[Checkpoint]
    problems: List[str] = field(default_factory=list)

    @property
    def config(self) -> Dict[str, Any]:
        return self.index.config

    @property
    def command(self) -> List[Union[str, Path]]:
        return self.index.command

    def incomplete(self) -> List[str]:
        """Everything missing or suspect in the run, one line each, checkpoint first."""
        lines = list(self.problems)
        for ckpt in self.checkpoints:
            lines.extend(f"{ckpt.name}: {p}" for p in ckpt.problems)
        return lines


def _expected_methods(config: Mapping[str, Any]) -> Tuple[str, ...]:
    methods = config.get("methods")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    if not isinstance(methods, (list, tuple)) or not methods:
        return DEFAULT_METHODS
    return tuple(str(m) for m in methods if str(m))


def _read_checkpoint(
    run_dir: Path, name: str, expected: Tuple[str, ...], config: Mapping[str, Any]
) -> Checkpoint:
    directory = run_dir / name
    ckpt = Checkpoint(name, expected_methods=expected)
    if not directory.is_dir():
        ckpt.problems.append(f"directory {name}/ missing (no analysis results)")
        return ckpt
    for path in sorted(directory.glob("*.json")):
        kind = kind_of(path.stem)
        if kind is not None:
            ckpt.records[path.stem] = read_stage(path, kind, run_dir)
    fidelity = config.get("fidelity_samples", 1) != 0
    ckpt.check(fidelity, config if config.get("heldout") else None)
    return ckpt


def _new_run(directory: Optional[Path], index: RunIndex, checkpoints: List[Checkpoint]) -> Run:
    run = Run(directory, index, checkpoints)
    if not index.checkpoints:
        run.problems.append("analysis.json lists no checkpoints")
    if not index.command:
        run.problems.append("analysis.json records no command")
    return run


def load_run(run_dir: PathLike) -> Run:
    """Read a run directory written by ``mftx analyze --out RUN_DIR``.

    Raises FileNotFoundError when the directory or its ``analysis.json`` is
    missing, and `FileFormatError` (a ValueError naming the file) for invalid
    JSON, an unknown format or a missing or mistyped field. Missing stage files
    are not errors: they are listed by `Run.incomplete`.
    """
    run_dir = Path(run_dir)
    hint = "expected the output directory of `mftx analyze --out RUN_DIR`"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: {hint}")
    path = run_dir / "analysis.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {hint}")
    index = RunIndex.from_json(fileio.read_json(path, run_dir), path)
    expected = _expected_methods(index.config)
    ckpts = [_read_checkpoint(run_dir, n, expected, index.config) for n in index.checkpoints]
    return _new_run(run_dir, index, ckpts)


def load_results(path: PathLike) -> Run:
    """Read a run back from the ``results.json`` a report wrote (`mftx.study.report.run_to_dict`).

    The records are the run directory's, so every table can be rebuilt; the
    problems are those recorded when the report was written.
    """
    path = Path(path)
    r = Reader(fileio.read_json(path), path)
    fmt = r.raw("format", None)
    if fmt != REPORT_FORMAT:
        raise FileFormatError(path, f"format is {fmt!r}, expected {REPORT_FORMAT!r}")
    index = RunIndex.from_json(r.raw("analysis"), path)
    expected = _expected_methods(index.config)
    ckpts = []
    for c in r.each("checkpoints"):
        recs = {}
        for stem, obj in c.dict("records").items():
            kind = kind_of(stem)
            if kind is None:
                raise c.fail("records", f"has an unknown record {stem!r}")
            recs[stem] = StageRecord.from_json(obj, path, kind)
        problems = [str(p) for p in c.list("problems", [])]
        ckpts.append(Checkpoint(c.str("name"), recs, expected, problems))
    run = Run(r.path("run_dir"), index, ckpts, [str(p) for p in r.list("problems", [])])
    return run
