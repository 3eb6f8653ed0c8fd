"""The build of `mftx.ops._C`: one version for the package, its metadata and the module,
and a stale module refused at import with a message that says to rebuild."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import mftx
from mftx.ops import _compiled

REPO = Path(__file__).resolve().parents[1]


def test_version_is_defined_once():
    pyproject = (REPO / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M)  # no second definition
    assert re.search(r'^dynamic = \["version"\]', project, re.M)
    assert 'input = "mftx/_version.py"' in pyproject
    assert re.search(r'^__version__ = "[^"]+"$', (REPO / "mftx/_version.py").read_text(), re.M)
    assert "mftx/_version.py" in (REPO / "CMakeLists.txt").read_text()
    assert mftx.__version__ == importlib.metadata.version("mftx")


def test_compiled_module_carries_version_and_source_hash(cpp):
    assert cpp.__version__ == mftx.__version__
    source = REPO / "csrc" / "mftx_ops.cpp"
    assert cpp.__source_sha256__ == hashlib.sha256(source.read_bytes()).hexdigest()
    assert _compiled.SOURCE == source
    assert _compiled.stale_build(cpp) is None


def test_stale_build_is_told_apart(tmp_path, cpp):
    older = types.SimpleNamespace()  # a build from before the version was compiled in
    assert "unknown version (an older build)" in _compiled.stale_build(older)
    other = types.SimpleNamespace(__version__="0.0.9", __source_sha256__=cpp.__source_sha256__)
    why = _compiled.stale_build(other)
    assert "built for mftx 0.0.9" in why and f"this package is mftx {mftx.__version__}" in why
    edited = tmp_path / "mftx_ops.cpp"  # same version, C++ edited since the build
    edited.write_bytes(b"// edited\n")
    why = _compiled.stale_build(cpp, source=edited)
    assert why == f"it was built from other C++ source than {edited}"
    assert _compiled.stale_build(cpp, source=tmp_path / "absent.cpp") is None  # installed wheel


def test_stale_build_falls_back_to_reference_at_import():
    """A stale _C found at import: RuntimeWarning saying to rebuild, reference path,
    HAS_CPP False (so CI's MFTX_REQUIRE_CPP=1 guard fails, naming the cause)."""
    code = (
        "import sys, types, warnings\n"
        "sys.modules['mftx.ops._C'] = types.ModuleType('mftx.ops._C')\n"
        "sys.modules['mftx.ops._C'].__version__ = '0.0.9'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, mftx.ops as o\n"
        "msgs = [str(x.message) for x in w if x.category is RuntimeWarning]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'stale build: it was built for mftx 0.0.9' in msgs[0], msgs\n"
        "assert '`pip install -e .`' in msgs[0] and 'reference path' in msgs[0], msgs\n"
        "assert not o.HAS_CPP and o.IMPORT_ERROR.startswith('stale build'), o.IMPORT_ERROR\n"
        "c = o.topk([torch.tensor([1.0, 3.0, 2.0])], 2)\n"
        "assert c.flat_index.tolist() == [1, 2], c\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MFTX_DISABLE_CPP"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
