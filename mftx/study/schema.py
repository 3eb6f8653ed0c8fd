"""The run files' common layout: stage records, their registry, and typed field reading.

Each stage of an analysis writes one `StageRecord` file, in one layout::

    {"format": "mftx.<kind>/<version>", "state": "complete" | "partial",
     "settings": {...}, "inputs": {...}, "result": {...}}

``settings`` are the options the result depends on, ``inputs`` the
fingerprints (SHA-256) of what it was computed from, ``result`` the stage's
payload: a class registered for its kind with `register`, which has
``to_json()`` and ``from_json(reader)``. A checkpoint has one file of a kind
(``<kind>.json``) or one per method (``<kind>-<method>.json``): `stem` and
`kind_of` convert. `Reader` gives typed access to a JSON object; its errors
(`FileFormatError`) name the file and the field. The concrete records are in
`mftx.study.records`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

from .. import fileio
from ..fileio import FileFormatError, Reader

__all__ = [
    "STATES",
    "Reader",
    "StageRecord",
    "kind_of",
    "read_stage",
    "register",
    "stage_kinds",
    "stem",
]

STATES = ("complete", "partial")


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
