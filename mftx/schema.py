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
`mftx.records`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

from . import fileio
from .fileio import FileFormatError

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
        """A path (written relative, read back absolute by `mftx.fileio`)."""
        value = self.raw(key, default)
        if value is None or isinstance(value, Path):
            return value
        if isinstance(value, str) and os.path.isabs(value):
            return Path(value)
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
