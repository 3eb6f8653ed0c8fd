"""Runs that survive SIGKILL, and the analysis under torchrun: a real `mftx finetune` and `mftx analyze` (subprocesses, a tiny
BERT) killed at seeded random moments and in the middle of file writes, resumed each time,
end with exactly the files of an uninterrupted run (timings aside); after every kill each
file a later run could read is whole. The same analysis spread over two processes by
torchrun writes the same files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from _toys import TOY_WORDS, toy_sst2
from safetensors import safe_open

from mftx import fileio
from mftx.models import make_tiny_bert

KILL_ENV = "MFTX_TEST_KILL_AT_WRITE"


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _finetune(root: Path, out: str) -> List[str]:
    return ["finetune", "--model", str(root / "tiny"), "--data", str(root / "sst2"),
            "--train-size", "32", "--batch-size", "8", "--lr", "1e-3", "--epochs", "2",
            "--eval-every", "2", "--targets", "0.3,0.995", "--state-every", "2",
            "--out", str(root / out)]  # fmt: skip


def _analyze(root: Path, ft: str, out: str) -> List[str]:
    return ["analyze", str(root / ft), "--data", str(root / "sst2"), "--train-size", "32",
            "--batch-size", "8", "--ks", "5,50", "--methods", "gradient,influence,taylor",
            "--damping", "1.0", "--max-iter", "30", "--fidelity-samples", "12",
            "--spectrum-steps", "6", "--spectrum-probes", "2", "--heldout", "--random-draws",
            "2", "--group-subsets", "2", "--group-ks", "2,4", "--out", str(root / out)]  # fmt: skip


def _start(args: List[str], **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mftx", *args, "--no-progress"]
    return subprocess.Popen(
        cmd, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _run(args: List[str]) -> float:
    t0 = time.perf_counter()
    p = _start(args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return time.perf_counter() - t0


def _check_whole(out: Path) -> int:
    """Every file a later run may read is whole; returns how many files were opened.

    Temporary files (``.name.xxxx.tmp``, the fine-tuning ``state.tmp``) and a checkpoint
    directory without its ``mftx.json`` (written last: the checkpoint is incomplete and
    nothing reads it) are what a kill may leave; anything else must parse."""
    n = 0
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out)
        if f.is_dir() or any(p.startswith(".") or p.endswith(".tmp") for p in rel.parts):
            continue
        if (f.parent / "config.json").is_file() and not (f.parent / "mftx.json").is_file():
            continue  # an unfinished checkpoint: mftx.json, written last, marks a whole one
        if f.suffix == ".json":
            json.loads(f.read_text())
            n += 1
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
            n += 1
    return n


def _kill_and_resume(args: List[str], out: Path, rng: random.Random, t_ref: float,
                     n_timed: int, n_writes: int) -> List[Tuple[str, Any, bool]]:  # fmt: skip
    """Start the run, SIGKILL it per the seeded schedule, check the files, resume; then
    run it to the end. Returns (kind, when, killed) per attempt."""
    # Early enough that a resumed run, which starts over its imports and loading, is still
    # running; writes counted from the resumed run's start.
    plan = [("time", round(rng.uniform(0.1, 0.5) * t_ref, 2)) for _ in range(n_timed)]
    plan += [("write", rng.randint(1, 3)) for _ in range(n_writes)]
    rng.shuffle(plan)
    log = []
    for kind, when in plan:
        if kind == "time":
            p = _start(args)
            try:
                p.wait(timeout=when)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        else:
            p = _start(args, **{KILL_ENV: str(when)})
            p.wait(timeout=600)
        killed = p.returncode == -signal.SIGKILL
        assert killed or p.returncode == 0, p.stderr.read()[-3000:]
        p.stderr.close()
        log.append((kind, when, killed))
        if out.exists():
            _check_whole(out)
    _run(args)
    return log


_TIMING = ("seconds", "elapsed")


def _strip(obj: Any) -> Any:
    """A record without its timings (keys naming seconds)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not any(t in k for t in _TIMING)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tree(out: Path) -> Dict[str, Any]:
    """Relative path -> comparable content of every result file (logs and temporaries aside)."""
    res: Dict[str, Any] = {}
    for f in sorted(out.rglob("*")):
        rel = str(f.relative_to(out))
        if f.is_dir() or f.suffix == ".log" or any(p.startswith(".") for p in Path(rel).parts):
            continue
        if f.suffix == ".json":
            res[rel] = _strip(json.loads(f.read_text()))
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                meta = {k: _strip(json.loads(v)) if v[:1] in "{[" else v
                        for k, v in (st.metadata() or {}).items()}  # fmt: skip
                tensors = {k: st.get_tensor(k) for k in st.keys()}
            res[rel] = (meta, tensors)
        else:
            res[rel] = f.read_bytes()
    return res


def _assert_same(ref: Path, got: Path) -> None:
    a, b = _tree(ref), _tree(got)
    assert sorted(a) == sorted(b)
    for rel in a:
        x, y = a[rel], b[rel]
        if isinstance(x, tuple):
            assert x[0] == y[0], rel
            assert sorted(x[1]) == sorted(y[1]), rel
            for k in x[1]:
                assert torch.equal(x[1][k], y[1][k]), f"{rel}: {k}"
        else:
            assert x == y, rel


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    toy_sst2(root / "sst2")
    make_tiny_bert(root / "tiny", TOY_WORDS, hidden_size=16, intermediate=32)
    return root


@pytest.fixture(scope="module")
def finetuned(root):
    """The uninterrupted fine-tuning run ``ft`` and its wall time."""
    return _run(_finetune(root, "ft"))


@pytest.fixture(scope="module")
def analyzed(root, finetuned):
    """The uninterrupted single-process analysis ``an`` of ``ft`` and its wall time."""
    return _run(_analyze(root, "ft", "an"))


def test_finetune_killed_and_resumed_ends_as_an_uninterrupted_run(root, finetuned):
    t_ref = finetuned
    log = _kill_and_resume(_finetune(root, "ft-k"), root / "ft-k", random.Random(19), t_ref,
                           n_timed=2, n_writes=1)  # fmt: skip
    for kind in ("time", "write"):  # the schedule really interrupted it, both ways
        assert any(k == kind and killed for k, _, killed in log), log
    _assert_same(root / "ft", root / "ft-k")
    assert not (root / "ft-k" / "state").exists()


def test_analyze_killed_and_resumed_ends_as_an_uninterrupted_run(root, analyzed):
    t_ref = analyzed
    log = _kill_and_resume(_analyze(root, "ft", "an-k"), root / "an-k", random.Random(20), t_ref,
                           n_timed=2, n_writes=2)  # fmt: skip
    for kind in ("time", "write"):
        assert any(k == kind and killed for k, _, killed in log), log
    _assert_same(root / "an", root / "an-k")


def test_a_kill_at_a_write_leaves_the_old_file_and_a_temporary(tmp_path):
    """The fault point itself: the N-th atomic write is cut short and the process killed."""
    target = tmp_path / "x.json"
    fileio.write_json(target, {"v": 1})
    code = ("import sys; from mftx import fileio; "
            "fileio.write_json(sys.argv[1], {'v': 2}); fileio.write_json(sys.argv[1], {'v': 3})")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, str(target)], env=_env(**{KILL_ENV: "2"}))
    assert p.returncode == -signal.SIGKILL
    assert fileio.read_json(target) == {"v": 2}
    leftovers = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".x.json.")
    with pytest.raises(json.JSONDecodeError):
        json.loads(leftovers[0].read_text())  # cut in half: never read back


def test_analyze_under_torchrun_writes_the_single_process_records(root, analyzed):
    """``torchrun --nproc_per_node=2 -m mftx analyze``: the stages are spread over the two
    processes (`mftx.study.parallel`) and the files are the single-process run's."""
    pytest.importorskip("torch.distributed.run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mftx", *_analyze(root, "ft", "an-2"), "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("| ckpt-30 | hessian |") == 1  # rank 0 printed the tables, once
    _assert_same(root / "an", root / "an-2")
    logs = [(root / "an-2" / n).read_text() for n in ("analyze.log", "analyze.rank1.log")]
    # Each method's scores were computed by one process only (spread by method: rank 0 the
    # gradient rule and taylor, rank 1 influence's three systems in one solve), not twice.
    both = "".join(logs)
    assert both.count("scoring influence on all, A, B in one solve") == 1
    assert "in one solve" in logs[1]
    for label in ("gradient", "taylor", "taylor@A", "taylor@B"):
        assert both.count(f"scoring with {label}\n") == 1, label
        assert f"scoring with {label}\n" in logs[0], label
    assert not [p for p in os.listdir(root / "an-2") if p.startswith(".parallel")]
