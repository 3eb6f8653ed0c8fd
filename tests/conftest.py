"""Shared fixtures for the mftx tests."""

from __future__ import annotations

import pytest

import mftx.ops


@pytest.fixture(scope="session")
def cpp():
    """The compiled module `mftx.ops._C`; skips the test when it did not load."""
    if not mftx.ops.HAS_CPP:
        pytest.skip(f"compiled ops unavailable: {mftx.ops.IMPORT_ERROR}")
    from mftx.ops import _compiled

    return _compiled._C


@pytest.fixture
def num_threads():
    """`mftx.ops.set_num_threads`, reset to the default (follow torch) afterwards."""
    yield mftx.ops.set_num_threads
    mftx.ops.set_num_threads(None)
