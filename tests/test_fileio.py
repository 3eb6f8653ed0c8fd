"""mftx.fileio: atomic writes, strict JSON with recorded non-finite numbers, relative paths."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mftx import fileio


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard token {c}"))


def test_non_finite_numbers_are_null_with_their_kind_and_come_back():
    doc = {"a": math.nan, "b": [1.0, math.inf, {"c/d~e": -math.inf}], "ok": 0.5}
    text = fileio.dumps(doc)
    raw = _strict(text)
    assert raw["a"] is None and raw["b"][1] is None and raw["b"][2]["c/d~e"] is None
    assert raw["non_finite"] == {"/a": "nan", "/b/1": "inf", "/b/2/c~1d~0e": "-inf"}
    back = fileio.loads(text)
    assert math.isnan(back["a"]) and back["b"][1] == math.inf
    assert back["b"][2]["c/d~e"] == -math.inf and back["ok"] == 0.5
    assert "non_finite" not in back
    assert "non_finite" not in _strict(fileio.dumps({"x": None}))  # a real null stays null


def test_unknown_objects_are_refused_with_their_place():
    with pytest.raises(TypeError, match=r"value at /a/1 is a object"):
        fileio.dumps({"a": [1, object()]})
    with pytest.raises(TypeError, match=r"key 3 at /m"):
        fileio.dumps({"m": {3: "x"}})
    with pytest.raises(TypeError, match="set"):
        fileio.dumps({"s": {1, 2}})
    with pytest.raises(ValueError, match="reserved"):
        fileio.dumps({"non_finite": 1, "x": math.nan})
    with pytest.raises(ValueError, match="non-finite"):
        fileio.dumps([math.nan])


def test_scalars_and_records_are_converted():
    class Rec:
        def to_json(self):
            return {"v": np.float32(0.5), "t": torch.tensor([3]), "z": torch.tensor(2.0)}

    assert _strict(fileio.dumps({"r": Rec(), "i": np.int64(7)})) == {
        "r": {"v": 0.5, "t": 3, "z": 2.0},
        "i": 7,
    }


def test_paths_are_written_relative_to_the_root_and_read_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run" / "out"
    doc = {
        "path": tmp_path / "data" / "x.tsv",
        "abs_text": str(tmp_path / "run" / "ckpt"),
        "cwd_relative": "../elsewhere",
        "root": root,
        "parent": root.parent,
        "plain": "runs/not-a-recognised-path",
        "sentence": "a/b is not a path",
    }
    raw = _strict(fileio.dumps(doc, root))
    assert raw == {
        "path": "../../data/x.tsv",
        "abs_text": "../ckpt",
        "cwd_relative": "../../../elsewhere",
        "root": ".",
        "parent": "..",
        "plain": "runs/not-a-recognised-path",
        "sentence": "a/b is not a path",
    }
    back = fileio.loads(fileio.dumps(doc, root), root)  # JSON types only: absolute strings
    assert back["path"] == str(tmp_path / "data" / "x.tsv")
    assert back["abs_text"] == str(tmp_path / "run" / "ckpt")
    assert back["cwd_relative"] == str(tmp_path.parent / "elsewhere")
    assert back["root"] == str(root) and back["parent"] == str(root.parent)
    assert back["plain"] == doc["plain"]
    # Written again under another root, the same places are named from there.
    assert _strict(fileio.dumps(back, tmp_path))["path"] == "./data/x.tsv"


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "d" / "f.json"
    fileio.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        fileio.write_json(path, {"a": object()})  # encoded before anything is written
    assert json.loads(path.read_text()) == {"a": 1}

    class Boom(Exception):
        pass

    with pytest.raises(Boom), fileio.atomic_target(path) as tmp:
        tmp.write_text("half")
        raise Boom
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(path.parent)) == ["f.json"]  # no temporary file left
    umask = os.umask(0o022)
    try:
        fileio.atomic_write(path, "x")
        assert path.stat().st_mode & 0o777 == 0o644  # as open() would create it
    finally:
        os.umask(umask)


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(fileio.FileFormatError, match=r"bad\.json: invalid JSON at line 1") as info:
        fileio.read_json(bad)
    assert info.value.path == str(bad)
    bad.write_text('{"a": 1, "non_finite": {"/b": "nan"}}')
    with pytest.raises(fileio.FileFormatError, match="bad pointer /b"):
        fileio.read_json(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(fileio.FileFormatError, match="UTF-8"):
        fileio.read_json(bad)


def test_relativize_text_rewrites_existing_absolute_paths(tmp_path):
    (tmp_path / "a").mkdir()
    root = tmp_path / "a"
    line = f"saved {tmp_path}/a/ckpt-60 and {tmp_path}/b.txt; ratio 3/4; url https://x.org/y"
    out = fileio.relativize_text(line, root)
    assert out == "saved ./ckpt-60 and ../b.txt; ratio 3/4; url https://x.org/y"
    assert fileio.relativize_text("/nonexistent-root-dir/x", root) == "/nonexistent-root-dir/x"


def test_relative_never_gives_an_absolute_path(tmp_path):
    for p in ("/", "/etc", str(tmp_path), "x", "../y"):
        assert not os.path.isabs(fileio.relative(p, tmp_path))
        assert fileio.is_relative_path_text(fileio.relative(p, tmp_path))
    assert Path(os.path.normpath(tmp_path / fileio.relative("/etc", tmp_path))) == Path("/etc")


def test_copy_json_keeps_paths_pointing_at_the_same_place(tmp_path):
    src = tmp_path / "runs" / "ft" / "finetune.json"
    fileio.write_json(src, {"data": tmp_path / "sst2", "x": math.nan})
    dst = fileio.copy_json(src, tmp_path / "docs" / "results" / "ft.json")
    assert _strict(src.read_text())["data"] == "../../sst2"
    assert _strict(dst.read_text())["data"] == "../../sst2"
    fileio.copy_json(src, tmp_path / "a" / "b" / "c" / "ft.json")
    back = fileio.read_json(tmp_path / "a" / "b" / "c" / "ft.json")
    assert back["data"] == str(tmp_path / "sst2") and math.isnan(back["x"])


def test_read_safetensors_round_trip_and_refusals(tmp_path):
    from safetensors.torch import save_file

    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    path = fileio.write_safetensors(tmp_path / "x.safetensors", t, {"format": "f/1", "p": tmp_path})
    back, meta = fileio.read_safetensors(path, "f/1", "thing")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], t[k]) for k in t)
    assert meta["p"] == str(tmp_path)  # written relative, read back absolute
    only, _ = fileio.read_safetensors(path, "f/1", "thing", keys=["b"])
    assert set(only) == {"b"}

    with pytest.raises(FileNotFoundError, match="no thing file"):
        fileio.read_safetensors(tmp_path / "missing.safetensors", "f/1", "thing")
    with pytest.raises(fileio.FileFormatError, match="format 'f/2'"):
        fileio.read_safetensors(path, "f/2", "thing")
    with pytest.raises(fileio.FileFormatError, match=r"without tensor\(s\) \['c'\]"):
        fileio.read_safetensors(path, "f/1", "thing", keys=["a", "c"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(fileio.FileFormatError, match="not a safetensors file") as info:
        fileio.read_safetensors(garbage, "f/1", "thing")
    assert info.value.path == str(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(fileio.FileFormatError, match="no 'mftx' metadata"):
        fileio.read_safetensors(plain, "f/1", "thing")
    bad_meta = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(1)}, str(bad_meta), metadata={"mftx": "{not json"})
    with pytest.raises(fileio.FileFormatError, match="invalid mftx metadata"):
        fileio.read_safetensors(bad_meta, "f/1", "thing")
