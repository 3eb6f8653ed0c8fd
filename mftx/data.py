"""SST-2 loading, seeded training subsets, and tokenised batches.

The data come from a directory of GLUE SST-2 TSV files (``train.tsv`` and
``dev.tsv``, header ``sentence<TAB>label``, no quoting), from the directory named
by the ``MFTX_DATA`` environment variable, or, for users online, from the
Hugging Face hub through the optional ``datasets`` package.

The reference setup trains on a seeded subset of 1,000 training rows and
validates on the full dev set (872 rows).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DEFAULT_TRAIN_SIZE",
    "ENV_VAR",
    "HUB_SOURCE",
    "SST2",
    "DataSourceError",
    "Example",
    "SST2FormatError",
    "load_sst2",
    "make_batches",
    "read_sst2_tsv",
]

Example = Tuple[str, int]
"""One labelled sentence: ``(sentence, label)`` with label 0 (negative) or 1 (positive)."""

ENV_VAR = "MFTX_DATA"
HUB_SOURCE = "hub:glue/sst2"
DEFAULT_TRAIN_SIZE = 1000
HEADER = ("sentence", "label")
FILES = ("train.tsv", "dev.tsv")

_HOW_TO_PASS = (
    f"pass a local directory of GLUE SST-2 TSVs (train.tsv, dev.tsv) with source=DIR "
    f"(command line: --data DIR) or set the {ENV_VAR} environment variable"
)


class SST2FormatError(ValueError):
    """A TSV file that is not in the GLUE SST-2 format; names the file and 1-based line."""

    def __init__(self, path: Union[str, Path], line: int, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path}, line {line}: {problem}")


class DataSourceError(RuntimeError):
    """No usable data source: the hub path failed and no local directory was given."""


@dataclass(frozen=True)
class SST2:
    """SST-2 training subset and full dev set, with where they came from.

    ``train`` and ``dev`` are tuples of ``(sentence, label)``; ``train`` is the
    seeded subset in drawn order (the whole file, in file order, when
    ``train_size`` is None or at least the number of rows). ``sha256`` maps file
    name to digest for local sources and is None for the hub. ``tokenizer`` and
    ``max_length`` are the defaults that `train_batches` / `dev_batches` use.
    """

    train: Tuple[Example, ...] = field(repr=False)
    dev: Tuple[Example, ...] = field(repr=False)
    source: str
    seed: int
    train_size: Optional[int]
    train_total: int
    dev_total: int
    sha256: Optional[Dict[str, str]] = field(default=None, compare=False, hash=False)
    tokenizer: Any = field(default=None, repr=False, compare=False, hash=False)
    max_length: int = 64

    def provenance(self) -> Dict[str, Any]:
        """JSON-ready description of the data: source, seed, sizes and file digests."""
        return {
            "source": self.source,
            "seed": self.seed,
            "train_size": self.train_size,
            "train_rows": len(self.train),
            "train_total": self.train_total,
            "dev_rows": len(self.dev),
            "dev_total": self.dev_total,
            "sha256": dict(self.sha256) if self.sha256 is not None else None,
        }

    def train_batches(
        self,
        batch_size: int = 16,
        *,
        shuffle: bool = True,
        seed: Optional[int] = None,
        pad_to: Optional[str] = None,
        drop_last: bool = False,
        tokenizer: Any = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """Batches of the training subset (see `make_batches`); seed defaults to the data seed."""
        return make_batches(
            self.train,
            self._tokenizer(tokenizer),
            batch_size=batch_size,
            max_length=self.max_length,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
            pad_to=pad_to,
            drop_last=drop_last,
        )

    def dev_batches(
        self,
        batch_size: int = 16,
        *,
        pad_to: Optional[str] = None,
        tokenizer: Any = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """Batches of the full dev set, in file order, last batch kept (see `make_batches`)."""
        return make_batches(
            self.dev,
            self._tokenizer(tokenizer),
            batch_size=batch_size,
            max_length=self.max_length,
            pad_to=pad_to,
        )

    def _tokenizer(self, tokenizer: Any) -> Any:
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError(
                "no tokenizer: pass tokenizer= here or to load_sst2(..., tokenizer=...)"
            )
        return tok


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sst2_tsv(path: Union[str, Path]) -> Tuple[List[Example], str]:
    """Read one GLUE SST-2 ``sentence<TAB>label`` file; return its rows and sha256.

    Lines are split on tabs without any quote handling (sentences hold ``\\`\\```
    and ``''`` tokens). Sentences are kept byte for byte (including the space
    before the tab); a trailing ``\\r`` is dropped from each line. Raises
    FileNotFoundError for a missing file and `SST2FormatError` naming the file
    and the 1-based line (the header is line 1) for anything malformed: a wrong
    header, a wrong column count, a label other than 0/1, an empty sentence, no
    rows at all, or bytes that are not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise FileNotFoundError(f"{path} is not a file")
        raise FileNotFoundError(f"SST-2 file not found: {path}")
    raw = path.read_bytes()
    digest = _sha256(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise SST2FormatError(path, line, f"not valid UTF-8 ({err.reason})") from None

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    if not lines:
        raise SST2FormatError(path, 1, "file is empty (expected header 'sentence\\tlabel')")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header != HEADER:
        raise SST2FormatError(
            path, 1, f"expected header 'sentence\\tlabel', found {lines[0].rstrip(chr(13))!r}"
        )
    rows: List[Example] = []
    for number, line in enumerate(lines[1:], start=2):
        cols = line.rstrip("\r").split("\t")
        if len(cols) != 2:
            raise SST2FormatError(
                path, number, f"expected 2 tab-separated columns, found {len(cols)}: {line!r}"
            )
        sentence, label = cols
        if label not in ("0", "1"):
            raise SST2FormatError(path, number, f"label must be 0 or 1, found {label!r}")
        if not sentence.strip():
            raise SST2FormatError(path, number, "empty sentence")
        rows.append((sentence, int(label)))
    if not rows:
        raise SST2FormatError(path, 1, "no rows after the header")
    return rows, digest


def _load_local(
    directory: Path, origin: str
) -> Tuple[List[Example], List[Example], Dict[str, str]]:
    if not directory.exists():
        raise FileNotFoundError(f"SST-2 data directory not found: {directory} ({origin})")
    if not directory.is_dir():
        raise FileNotFoundError(f"SST-2 data source is not a directory: {directory} ({origin})")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SST-2 data directory {directory} ({origin}) lacks {', '.join(missing)}: "
            "expected the GLUE SST-2 files train.tsv and dev.tsv"
        )
    train, train_sha = read_sst2_tsv(directory / "train.tsv")
    dev, dev_sha = read_sst2_tsv(directory / "dev.tsv")
    return train, dev, {"train.tsv": train_sha, "dev.tsv": dev_sha}


def _load_hub() -> Tuple[List[Example], List[Example]]:
    try:
        import datasets  # optional dependency, imported only on this path
    except ImportError as err:
        raise DataSourceError(
            "no SST-2 source given and the optional package 'datasets' is not installed "
            f"(needed to fetch glue/sst2 from the Hugging Face hub): {_HOW_TO_PASS}, "
            "or pip install datasets"
        ) from err
    try:
        ds = datasets.load_dataset("glue", "sst2")
        splits = []
        for name in ("train", "validation"):
            part = ds[name]
            splits.append([(str(s), int(y)) for s, y in zip(part["sentence"], part["label"])])
    except Exception as err:
        raise DataSourceError(
            f"could not load glue/sst2 from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"{_HOW_TO_PASS}"
        ) from err
    for name, rows in zip(("train", "validation"), splits):
        bad = [i for i, (_, y) in enumerate(rows) if y not in (0, 1)]
        if bad:
            raise DataSourceError(
                f"glue/sst2 {name} split from the hub has labels other than 0/1 "
                f"(first at row {bad[0]}); {_HOW_TO_PASS}"
            )
    return splits[0], splits[1]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def load_sst2(
    source: Union[str, os.PathLike, None] = None,
    train_size: Optional[int] = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    tokenizer: Any = None,
    max_length: int = 64,
) -> SST2:
    """Load SST-2: a seeded training subset and the full dev set.

    Args:
        source: directory holding ``train.tsv`` and ``dev.tsv``. None means the
            ``MFTX_DATA`` environment variable when set, else the hub via
            ``datasets.load_dataset("glue", "sst2")`` (optional dependency; when
            it is missing or fails, `DataSourceError` says how to pass a
            directory).
        train_size: rows drawn from the training set without replacement, in
            the order ``torch.randperm`` with a generator seeded by `seed` gives
            (independent of the global RNG). None, or at least the number of
            rows, keeps the full training set in file order.
        seed: seed of the subset draw (recorded; also the default shuffle seed
            of `SST2.train_batches`).
        tokenizer: optional default tokenizer for `SST2.train_batches` /
            `SST2.dev_batches`.
        max_length: truncation length of those batches.

    Raises:
        FileNotFoundError: missing directory or file (named).
        SST2FormatError: malformed file (file and line named).
        DataSourceError: no local source and the hub path is unavailable.
    """
    if train_size is not None:
        _check_positive_int("train_size", train_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _check_positive_int("max_length", max_length)

    if source is None and os.environ.get(ENV_VAR):
        source, origin = os.environ[ENV_VAR], f"from the {ENV_VAR} environment variable"
    else:
        origin = "passed as source"
    sha: Optional[Dict[str, str]]
    if source is None:
        train_all, dev = _load_hub()
        name, sha = HUB_SOURCE, None
    else:
        directory = Path(source).expanduser().resolve()
        train_all, dev, sha = _load_local(directory, origin)
        name = str(directory)

    total = len(train_all)
    if train_size is None or train_size >= total:
        train = train_all
    else:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(total, generator=gen)[:train_size].tolist()
        train = [train_all[i] for i in order]
    return SST2(
        train=tuple(train),
        dev=tuple(dev),
        source=name,
        seed=seed,
        train_size=train_size,
        train_total=total,
        dev_total=len(dev),
        sha256=sha,
        tokenizer=tokenizer,
        max_length=max_length,
    )


def make_batches(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 16,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    pad_to: Optional[str] = None,
    drop_last: bool = False,
) -> List[Dict[str, torch.Tensor]]:
    """Tokenise ``(sentence, label)`` pairs into a list of batch dicts of tensors.

    Each batch holds ``input_ids``, ``attention_mask``, ``token_type_ids`` (when
    the tokenizer produces them) and ``labels`` (int64). Sequences are truncated
    to `max_length`. ``pad_to=None`` pads each batch to its longest sequence
    (dynamic padding); ``pad_to="max_length"`` pads every batch to `max_length`
    (fixed shapes, for compiled backends). With `shuffle` the order comes from
    ``torch.randperm`` with a generator seeded by `seed` (global RNG untouched);
    otherwise the given order is kept. The last, smaller batch is kept unless
    `drop_last`. The result depends only on the arguments.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_length", max_length)
    if pad_to not in (None, "max_length"):
        raise ValueError(f"pad_to must be None (dynamic padding) or 'max_length', got {pad_to!r}")
    padding = "max_length" if pad_to == "max_length" else "longest"
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and isinstance(ex[0], str)):
            raise TypeError(f"examples[{i}] must be a (sentence, label) pair, got {ex!r}")
    if shuffle:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=gen).tolist()
        examples = [examples[i] for i in order]
    stop = len(examples) - (len(examples) % batch_size if drop_last else 0)
    batches: List[Dict[str, torch.Tensor]] = []
    for start in range(0, stop, batch_size):
        chunk = examples[start : start + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk],
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {
            key: enc[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc
        }
        batch["labels"] = torch.tensor([int(y) for _, y in chunk], dtype=torch.long)
        batches.append(batch)
    return batches
