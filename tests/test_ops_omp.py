"""The compiled ops under OpenMP teams smaller than requested, and from several threads.

OpenMP may run a parallel region with fewer threads than `num_threads` asks for:
``OMP_THREAD_LIMIT``, ``OMP_DYNAMIC=true`` (team sized by the idle cores), a region
nested in another (one thread unless ``OMP_MAX_ACTIVE_LEVELS`` allows more, and then
no more than the enclosing team leaves of the thread limit). Each case runs
`_omp_worker.py` in a subprocess with the variables set (they are read once, when the
runtime starts) and asks for more threads than the team will get; every op must equal
its reference twin bit for bit, also called from several Python threads at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _omp_worker import write_expected

import mftx.ops as ops

WORKER = Path(__file__).with_name("_omp_worker.py")

pytestmark = pytest.mark.skipif(
    not ops.HAS_CPP, reason=f"compiled ops unavailable: {ops.IMPORT_ERROR}"
)

# More threads than the teams get: the worker's inputs make 6 pieces of work, for
# teams of at most the idle cores under OMP_DYNAMIC, 1 thread under OMP_THREAD_LIMIT=1.
MANY = "13"

SCENARIOS = {
    # name: (environment, mftx threads, modes)
    "thread-limit-1": ({"OMP_THREAD_LIMIT": "1"}, MANY, ["serial", "concurrent", "nested"]),
    "dynamic": ({"OMP_DYNAMIC": "true"}, MANY, ["serial", "concurrent"]),
    # torch caps its own default at the core count: ask for the odd count explicitly too.
    "odd-num-threads": ({"OMP_NUM_THREADS": "3"}, "3", ["serial", "concurrent"]),
    # Nested regions may be active, but the outer team holds 2 of the 3 threads allowed.
    "nested-active": ({"OMP_MAX_ACTIVE_LEVELS": "2", "OMP_THREAD_LIMIT": "3"}, MANY, ["nested"]),
    # Default settings: nested regions, and torch's pool busy beside concurrent calls.
    "default": ({}, "5", ["nested", "concurrent", "torch-busy"]),
}
OMP_VARS = ("OMP_THREAD_LIMIT", "OMP_DYNAMIC", "OMP_NUM_THREADS", "OMP_MAX_ACTIVE_LEVELS")


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("omp") / "expected.safetensors"
    write_expected(path)  # the reference twins, computed once for every worker
    return path


def run_worker(expected: Path, env_extra: dict, threads: str, modes: list) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_extra, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run(
        [sys.executable, str(WORKER), str(expected), threads, *modes],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"worker exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ops_equal_reference_under_small_teams(name, expected):
    env, threads, modes = SCENARIOS[name]
    report = run_worker(expected, env, threads, modes)
    seen = report["settings"]
    # The environment really did what the scenario is about.
    if "OMP_THREAD_LIMIT" in env:
        assert seen["thread_limit"] == int(env["OMP_THREAD_LIMIT"])
    if "OMP_DYNAMIC" in env:
        assert seen["dynamic"] is True
    if "OMP_MAX_ACTIVE_LEVELS" in env:
        assert seen["max_active_levels"] == int(env["OMP_MAX_ACTIVE_LEVELS"])
    assert seen["mftx_threads"] == int(threads)
    if "nested" in modes:
        assert report["nested_levels"] and set(report["nested_levels"]) == {1}
    assert set(report["bad"]) == {m for m in modes if m != "torch-busy"}
    for mode, bad in report["bad"].items():
        assert bad == [], f"{name}/{mode}: {bad}"


def test_changed_buffers_raise_instead_of_overrunning():
    """select/toward_zero count the kept entries, then write them into slots of that
    size; another thread writing to the tensors meanwhile (the ops release the GIL)
    must not make them write past the slots: they raise, or return entries that all
    met the threshold when read."""
    code = (
        "import threading, torch, mftx.ops as o\n"
        "o.set_num_threads(4)\n"
        "x = torch.randn(1_000_000)\n"
        "stop = threading.Event()\n"
        "def flip():\n"
        "    while not stop.is_set():\n"
        "        x.neg_()\n"
        "t = threading.Thread(target=flip); t.start()\n"
        "raised = returned = 0\n"
        "for _ in range(15):\n"
        "    try:\n"
        "        c = o.select([x], 0.0)\n"
        "    except RuntimeError as e:\n"
        "        assert 'changed while the op read them' in str(e), e\n"
        "        raised += 1\n"
        "    else:\n"
        "        assert len(c) <= x.numel() and bool((c.value < 0).all())\n"
        "        returned += 1\n"
        "stop.set(); t.join()\n"
        "print('OK', raised, returned)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
