"""Every file mftx writes goes through here: atomically, as strict JSON, with relative paths.

- `atomic_target` / `atomic_write`: the data goes to a temporary file in the
  destination's directory, which then replaces the destination in one step,
  so an interrupted write never leaves half a file (and never a stale temp file).
- `dumps` / `write_json`: strict JSON (no ``NaN`` or ``Infinity`` tokens).
  A non-finite float is written as ``null`` and the reason ("nan", "inf",
  "-inf") is recorded under the document's top-level ``"non_finite"`` key,
  keyed by the value's JSON pointer, so `loads` restores it exactly. Objects
  JSON has no type for are refused with the pointer of the offending value,
  except paths, records with a ``to_json()`` method and numeric scalars
  (NumPy scalars, one-element tensors).
- Paths are never written absolute: a path object, an absolute path string, or
  a string starting with ``./`` or ``../`` (a path relative to the working
  directory) is written relative to a root directory (the run directory, the
  report directory, the checkpoint directory), always in the form ``.``,
  ``..``, ``./x`` or ``../x``. `loads` with the same root turns such strings back into
  absolute path strings, so a document copied into a file with another root is
  re-expressed correctly (and what is read holds JSON types only).
- `Reader`: typed access to the fields of a JSON object read back; its errors
  (`FileFormatError`) name the file and the field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "NON_FINITE_KEY",
    "FileFormatError",
    "Reader",
    "atomic_target",
    "atomic_write",
    "copy_json",
    "dumps",
    "is_relative_path_text",
    "loads",
    "read_json",
    "read_safetensors",
    "relative",
    "relativize_text",
    "write_json",
    "write_safetensors",
]

PathLike = Union[str, os.PathLike]

#: Top-level key of a written document that records its non-finite numbers.
NON_FINITE_KEY = "non_finite"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class FileFormatError(ValueError):
    """A file that exists but cannot be read as what it should be; names the file."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_target(path: PathLike) -> Iterator[Path]:
    """A temporary path to write to; it replaces `path` when the block ends without error.

    For writers that want a file name (safetensors, matplotlib). The directory
    is created if needed; on error the temporary file is removed and `path`
    keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # like mkstemp, but with the permissions the umask gives (not 0600)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield Path(tmp)
        _fault_point(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: Crash-safety tests: ``MFTX_TEST_KILL_AT_WRITE=N`` makes the N-th atomic write of the
#: process cut its temporary file to half and SIGKILL the process before the rename (a
#: kill in the middle of writing). Unset, it costs one dictionary lookup per write.
_KILL_ENV = "MFTX_TEST_KILL_AT_WRITE"
_writes = [0]


def _fault_point(tmp: Path) -> None:
    at = os.environ.get(_KILL_ENV)
    if not at:
        return
    _writes[0] += 1
    if _writes[0] == int(at):
        size = tmp.stat().st_size
        with open(tmp, "r+b") as f:
            f.truncate(size // 2)
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    with atomic_target(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


# --------------------------------------------------------------------------- paths


def is_relative_path_text(text: str) -> bool:
    """Whether `text` has the form this module writes relative paths in (``.``, ``..``,
    ``./x``, ``../x``)."""
    return text in (".", "..") or text.startswith("./") or text.startswith("../")


def _absolute(path: PathLike) -> Path:
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def relative(path: PathLike, root: PathLike) -> str:
    """`path` relative to `root`, as ``.``, ``./x`` or ``../x`` with ``/`` separators.

    A relative `path` is taken relative to the working directory first.
    """
    try:
        rel = os.path.relpath(_absolute(path), _absolute(root))
    except ValueError as exc:  # another drive on Windows
        raise ValueError(f"cannot express {path} relative to {root}: {exc}") from None
    rel = Path(rel).as_posix()
    return rel if is_relative_path_text(rel) else f"./{rel}"


_ABSOLUTE_IN_TEXT = re.compile(r"(?<![\w./:~-])/[\w.@+~-]+(?:/[\w.@+~-]*)*")


def relativize_text(text: str, root: PathLike) -> str:
    """`text` with every absolute path in it (one whose first component exists) made relative.

    For free text such as log lines; structured data uses `dumps`.
    """

    def repl(m: re.Match) -> str:
        found = m.group(0)
        first = "/" + found.lstrip("/").split("/", 1)[0]
        return relative(found, root) if os.path.exists(first) else found

    return _ABSOLUTE_IN_TEXT.sub(repl, text)


# --------------------------------------------------------------------------- JSON


def _pointer(parent: str, key: Any) -> str:
    return f"{parent}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _encode(value: Any, root: Path, pointer: str, non_finite: Dict[str, str]) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        non_finite[pointer or "/"] = (
            "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        )
        return None
    if isinstance(value, str):
        if (os.path.isabs(value) and len(value) > 1) or is_relative_path_text(value):
            return relative(value, root)
        return value
    if isinstance(value, os.PathLike):
        return relative(value, root)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"cannot write JSON: key {k!r} at {pointer or '/'} is a "
                    f"{type(k).__name__}, not a string"
                )
            out[k] = _encode(v, root, _pointer(pointer, k), non_finite)
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v, root, _pointer(pointer, i), non_finite) for i, v in enumerate(value)]
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return _encode(to_json(), root, pointer, non_finite)
    item = getattr(value, "item", None)  # NumPy scalars, 0-d arrays, one-element tensors
    numel = getattr(value, "numel", None)
    if callable(item) and (
        getattr(value, "shape", None) == () or (callable(numel) and numel() == 1)
    ):
        return _encode(item(), root, pointer, non_finite)
    raise TypeError(f"cannot write JSON: the value at {pointer or '/'} is a {type(value).__name__}")


def dumps(obj: Any, root: PathLike = ".") -> str:
    """Strict JSON text of `obj` (see the module docstring), paths relative to `root`."""
    non_finite: Dict[str, str] = {}
    doc = _encode(obj, Path(root), "", non_finite)
    if non_finite:
        if not isinstance(doc, dict):
            raise ValueError(f"cannot write JSON: non-finite numbers at {sorted(non_finite)}")
        if NON_FINITE_KEY in doc:
            raise ValueError(f"cannot write JSON: {NON_FINITE_KEY!r} is a reserved key")
        doc[NON_FINITE_KEY] = non_finite
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _resolve_pointer(doc: Any, pointer: str) -> tuple:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    return node, int(last) if isinstance(node, list) else last


def _decode(value: Any, root: Optional[Path]) -> Any:
    if isinstance(value, str):
        if root is not None and is_relative_path_text(value):
            return os.path.normpath(root / value)
        return value
    if isinstance(value, dict):
        return {k: _decode(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, root) for v in value]
    return value


def loads(text: str, root: Optional[PathLike] = None) -> Any:
    """Parse what `dumps` wrote: non-finite numbers restored, paths made absolute under `root`.

    With `root` None, relative path strings are left as they are. Raises
    ValueError for invalid JSON or an invalid ``non_finite`` record.
    """
    doc = json.loads(text)
    if isinstance(doc, dict) and NON_FINITE_KEY in doc:
        record = doc.pop(NON_FINITE_KEY)
        if not isinstance(record, dict):
            raise ValueError(f"{NON_FINITE_KEY!r} must be an object")
        for pointer, kind in record.items():
            if kind not in _NON_FINITE:
                raise ValueError(f"{NON_FINITE_KEY!r}: unknown kind {kind!r} at {pointer}")
            try:
                node, key = _resolve_pointer(doc, pointer)
                if node[key] is not None:
                    raise ValueError("holds a value, not null")
                node[key] = _NON_FINITE[kind]
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise ValueError(f"{NON_FINITE_KEY!r}: bad pointer {pointer} ({exc})") from None
    return _decode(doc, None if root is None else _absolute(root))


def write_json(path: PathLike, obj: Any, root: Optional[PathLike] = None) -> Path:
    """Write `obj` as strict JSON atomically; paths relative to `root` (default: the file's
    directory). The text is encoded before anything is written: a bad value leaves no file."""
    path = Path(path)
    text = dumps(obj, path.parent if root is None else root)
    return atomic_write(path, text)


def write_safetensors(path: PathLike, tensors: Dict[str, Any], meta: Any) -> Path:
    """Write `tensors` as a safetensors file atomically, `meta` as strict JSON under its
    ``mftx`` metadata key (paths relative to the file's directory)."""
    from safetensors.torch import save_file

    path = Path(path)
    text = dumps(meta, path.parent)
    with atomic_target(path) as tmp:  # an interrupted save leaves no half file
        save_file(tensors, str(tmp), metadata={"mftx": text})
    return path


def read_safetensors(
    path: PathLike, fmt: str, what: str, keys: Optional[Sequence[str]] = None
) -> Tuple[Dict[str, Any], Any]:
    """Read a file written by `write_safetensors`: ``(tensors, meta)``.

    `fmt` is the ``"format"`` the metadata must carry and `what` names the kind of
    file in messages ("scores", "low-rank inverse"). `keys`: the tensors to read
    (default: all). Raises FileNotFoundError for a missing file and
    `FileFormatError` naming the file for anything else that is not such a file:
    not safetensors, no ``mftx`` metadata, invalid metadata JSON, another format, a
    missing tensor. Nothing is unpickled.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "mftx" not in header:
                raise FileFormatError(
                    path, f"a safetensors file but not mftx {what} (no 'mftx' metadata)"
                )
            try:
                meta = loads(header["mftx"], path.parent)
            except ValueError as exc:
                raise FileFormatError(path, f"invalid mftx metadata ({exc})") from None
            if not isinstance(meta, dict) or meta.get("format") != fmt:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise FileFormatError(path, f"not mftx {what} in format {fmt!r} (format {found!r})")
            present = set(f.keys())
            wanted = list(present) if keys is None else list(keys)
            missing = [k for k in wanted if k not in present]
            if missing:
                raise FileFormatError(path, f"mftx {what} without tensor(s) {missing}")
            tensors = {k: f.get_tensor(k) for k in wanted}
    except (FileFormatError, FileNotFoundError):
        raise
    except Exception as exc:  # safetensors' own header errors: not a safetensors file
        raise FileFormatError(path, f"not a safetensors file ({exc})") from None
    return tensors, meta


def read_json(path: PathLike, root: Optional[PathLike] = None) -> Any:
    """Read a JSON file written by `write_json` (relative paths resolved against `root`,
    default: the file's directory). Raises `FileFormatError` naming the file if it is invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"not UTF-8 text ({exc})") from None
    try:
        return loads(text, path.parent if root is None else root)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise FileFormatError(path, str(exc)) from None


def copy_json(src: PathLike, dst: PathLike) -> Path:
    """Copy a JSON file `write_json` wrote, re-expressing its relative paths for `dst`'s place."""
    return write_json(dst, read_json(src))


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
