"""Resumable stages: a result on disk is reused only if computed the same way from the same inputs.

A `Stage` is one result file of a run directory (a `mftx.study.schema.StageRecord`)
together with the settings and input fingerprints the current run asks for.
`Stage.previous()` decides, the same way for every stage:

- no file, or ``force``: None, compute from scratch;
- recorded settings or inputs differ from the requested ones: `StageMismatch`,
  naming every differing setting and input (``--force`` recomputes instead);
- otherwise the record: complete (reuse it) or partial (resume from what it holds).

`Stage.save(result, complete)` writes the record atomically; a stage saves
partial records as it goes so an interrupted run resumes. Fingerprints of
inputs are SHA-256 digests of tensors (`digest_tensors`, `digest_batches`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import fileio
from ..masking import fingerprint
from . import parallel, schema

__all__ = ["Stage", "StageMismatch", "digest_batches", "digest_tensors", "flatten_settings"]


class StageMismatch(ValueError):
    """A result on disk was computed with other settings or from other inputs."""

    def __init__(self, path: Path, differences: List[str]) -> None:
        self.path = path
        self.differences = differences
        super().__init__(
            f"{path} was computed differently: {'; '.join(differences)}. Rerun with --force "
            "to recompute it, or write to another --out"
        )


def digest_tensors(named: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: equal iff the named tensors are bitwise equal."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode() + b"\0" + fingerprint([t]).encode())
    return h.hexdigest()


def digest_batches(batches: Sequence[Mapping[str, Any]]) -> str:
    """Fingerprint of a list of batches (dicts of tensors), order and keys included."""

    def items():
        for i, batch in enumerate(batches):
            for key in sorted(batch):
                value = batch[key]
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                yield f"{i}.{key}", value

    return digest_tensors(items())


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested settings as ``{"a.b": value}`` (lists and scalars are leaves)."""
    out: Dict[str, Any] = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_settings(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value: Any) -> str:
    """A fingerprint shortened to 12 hex digits."""
    return value[:12] + "…" if isinstance(value, str) and len(value) == 64 else repr(value)


@dataclass
class Stage:
    """One result file and what the current run asks of it.

    ``defaults``: flattened setting -> value that a record written before the
    setting existed is taken to have used.
    """

    path: Path
    kind: str
    settings: Dict[str, Any]
    inputs: Dict[str, str]
    root: Path
    force: bool = False
    defaults: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        # As the settings read back from disk: tuples become lists, paths absolute.
        self.settings = fileio.loads(fileio.dumps(self.settings, self.root), self.root)
        # Under torchrun (`mftx.study.parallel`): one process owns, computes and writes it.
        split = parallel.current()
        self._owner, self._index = split.assign() if split is not None else (0, 0)

    @property
    def mine(self) -> bool:
        """Whether this process computes and writes the stage (always, in one process)."""
        split = parallel.current()
        return split is None or split.rank == self._owner

    def differences(self, rec: schema.StageRecord) -> List[str]:
        """What differs between `rec` and this run's settings and inputs, one phrase each."""
        out = []
        have = flatten_settings(rec.settings)
        for key, want in flatten_settings(self.settings).items():
            if key in have:
                got = have[key]
            elif key in self.defaults:
                got = self.defaults[key]
            else:
                out.append(f"{key} not recorded on disk ({want!r} now)")
                continue
            if got != want:
                out.append(f"{key} = {got!r} on disk, {want!r} now")
        for key, want in self.inputs.items():
            got = rec.inputs.get(key)
            if got != want:
                what = "not recorded" if got is None else f"{_short(got)} on disk"
                out.append(f"input {key!r} differs ({what}, {_short(want)} now)")
        return out

    def previous(self) -> Optional[schema.StageRecord]:
        """The record to reuse or resume, None to start afresh; raises `StageMismatch`.

        A stage another process owns: its record once the owner has gone past it."""
        if not self.mine:
            if self._index < 0:  # read back inside `parallel.spread`: its owner is done
                if not self.path.is_file():
                    raise RuntimeError(f"{self.path}: its owner finished without writing it")
            else:
                parallel.current().wait_past(self._owner, self._index)
                if not self.path.is_file():
                    return None
            rec = schema.read_stage(self.path, self.kind, self.root)
            diff = self.differences(rec)
            if diff:
                raise StageMismatch(self.path, diff)
            return rec
        if self.force or not self.path.is_file():
            return None
        rec = schema.read_stage(self.path, self.kind, self.root)
        diff = self.differences(rec)
        if diff:
            raise StageMismatch(self.path, diff)
        return rec

    def save(self, result: Any, complete: bool = True) -> schema.StageRecord:
        rec = schema.StageRecord(
            self.kind, self.settings, self.inputs, "complete" if complete else "partial", result
        )
        if self.mine:  # the owner has written the same record
            fileio.write_json(self.path, rec, root=self.root)
        return rec
