"""mftx's OpenMP threads beside torch's: what the mftx thread count costs or saves.

torch and mftx.ops._C share one OpenMP runtime (libgomp, loaded once under one soname),
so on one Python thread their parallel regions take turns on one pool of workers;
each further Python thread that calls either gets a pool of its own, and pools
running at the same time compete for the cores (oversubscription).

    python benchmarks/bench_ops_threads.py [ITERATIONS]        # the two workloads below
    python benchmarks/bench_ops_threads.py --analyze CKPT DATA  # ops inside `mftx analyze`

Workloads, per OpenMP wait policy (unset, as users run; PASSIVE: one fresh process
each), the mftx thread settings (1, torch's count = the default, twice torch's) taking
turns so that they share the machine's background load:
- ``alternating``: a forward pass of a MiniLM-sized encoder (6 layers, width 384,
  16 × 64 tokens; torch's threads), then topk k=10,000 over 10,616,832 scores laid out
  like MiniLM's analysed weights, mask_ and restore_ of those 10,000: on one Python
  thread, as `mftx analyze` interleaves evaluation and masking.
- ``concurrent``: the same forwards on one Python thread while a second one loops over
  the same ops: both pools at work at once.
Reported: median milliseconds per forward and per round of ops.

``--analyze`` runs ``mftx analyze CKPT --data DATA --methods gradient
--fidelity-samples 0`` (everything else default) once per mftx thread setting, each
in a fresh process, timing every call of the ops (wrapped) and the whole run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import mftx.ops as ops

MINILM_SHAPES = [s for _ in range(6) for s in [(384, 384)] * 4 + [(1536, 384), (384, 1536)]]
MINILM_ANALYSED = 10_616_832
assert sum(a * b for a, b in MINILM_SHAPES) == MINILM_ANALYSED
K = 10_000


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()


def op_inputs():
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(s, generator=g) for s in MINILM_SHAPES]
    weights = [torch.randn(s, generator=g) * 0.05 for s in MINILM_SHAPES]
    return scores, weights


def ops_round(scores, weights) -> None:
    c = ops.topk(scores, K)
    saved = ops.mask_(weights, c)
    ops.restore_(weights, c, saved)


def thread_settings():
    """(mftx threads, label): 1, torch's count (the default), twice torch's."""
    t = torch.get_num_threads()
    return [(1, "1"), (t, f"{t} (torch's, default)"), (2 * t, f"{2 * t}")]


def run_policy(mode: str, iterations: int) -> dict:
    """Every thread setting in turn, `iterations` times, in this process (one wait
    policy): the settings see the same background load. Median ms per forward and
    per ops round for each setting."""
    model = encoder()
    x = torch.randn(16, 64, 384)
    scores, weights = op_inputs()
    settings = [n for n, _ in thread_settings()]
    fwd = {n: [] for n in settings}
    rounds = {n: [] for n in settings}

    def op_loop(n, stop):
        while not stop.is_set():
            t0 = time.perf_counter()
            ops_round(scores, weights)
            rounds[n].append(time.perf_counter() - t0)

    with torch.no_grad():
        model(x)  # warm-up of both pools
        ops_round(scores, weights)
        for it in range(iterations):
            for n in settings[it % 3 :] + settings[: it % 3]:  # rotated order
                ops.set_num_threads(n)
                if mode == "alternating":  # forward, then the ops, as analyze interleaves them
                    t0 = time.perf_counter()
                    model(x)
                    t1 = time.perf_counter()
                    ops_round(scores, weights)
                    fwd[n].append(t1 - t0)
                    rounds[n].append(time.perf_counter() - t1)
                else:  # concurrent: ops on a second Python thread during two forwards
                    stop = threading.Event()
                    side = threading.Thread(target=op_loop, args=(n, stop))
                    side.start()
                    for _ in range(2):
                        t0 = time.perf_counter()
                        model(x)
                        fwd[n].append(time.perf_counter() - t0)
                    stop.set()
                    side.join()
    return {
        str(n): {
            "forward_ms": 1e3 * statistics.median(fwd[n]),
            "ops_ms": 1e3 * statistics.median(rounds[n]) if rounds[n] else float("nan"),
            "op_rounds": len(rounds[n]),
        }
        for n in settings
    }


def in_subprocess(args, policy, threads=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    if threads is not None:
        env["MFTX_BENCH_THREADS"] = str(threads)
    r = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=3600
    )
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def workloads(iterations: int) -> str:
    lines = [
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"medians over {iterations} turns of each setting",
        "",
        "| OMP_WAIT_POLICY | workload | mftx threads | forward | ops round |",
        "|---|---|---|---:|---:|",
    ]
    for policy in (None, "PASSIVE"):
        for mode in ("alternating", "concurrent"):
            r = in_subprocess(["--run", mode, str(iterations)], policy)
            for n, label in thread_settings():
                m = r[str(n)]
                lines.append(
                    f"| {policy or 'unset'} | {mode} | {label} | {m['forward_ms']:.0f} ms "
                    f"| {m['ops_ms']:.1f} ms |"
                )
    return "\n".join(lines)


def run_analyze(ckpt: str, data: str) -> dict:
    """`mftx analyze` in this process, every call of the ops timed."""
    from mftx.cli import main

    spent = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                n, s = spent.get(name, (0, 0.0))
                spent[name] = (n + 1, s + time.perf_counter() - t0)

        return wrapper

    for name in ("topk", "select", "toward_zero", "mask_", "restore_"):
        setattr(ops, name, timed(name, getattr(ops, name)))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        args = ["analyze", ckpt, "--data", data, "--methods", "gradient"]
        rc = main([*args, "--fidelity-samples", "0", "--out", out, "--no-progress"])
        wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"mftx analyze exited with {rc}")
    return {"wall_s": wall, "ops": {k: {"calls": n, "s": s} for k, (n, s) in spent.items()}}


def analyze_table(ckpt: str, data: str) -> str:
    lines = [
        f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY unset",
        "",
        "| mftx threads | analyze wall | in the ops | toward_zero | topk | mask_ + restore_ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for threads, label in thread_settings():
        r = in_subprocess(["--analyze-run", ckpt, data], None, threads)
        s = {k: v["s"] for k, v in r["ops"].items()}
        lines.append(
            f"| {label} | {r['wall_s']:.1f} s | {sum(s.values()) * 1e3:.0f} ms "
            f"| {s.get('toward_zero', 0) * 1e3:.0f} ms | {s.get('topk', 0) * 1e3:.0f} ms "
            f"| {(s.get('mask_', 0) + s.get('restore_', 0)) * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if os.environ.get("MFTX_BENCH_THREADS"):
        ops.set_num_threads(int(os.environ["MFTX_BENCH_THREADS"]))
    argv = sys.argv[1:]
    if argv[:1] == ["--run"] and len(argv) == 3:
        print(json.dumps(run_policy(argv[1], int(argv[2]))))
    elif argv[:1] == ["--analyze-run"] and len(argv) == 3:
        print(json.dumps(run_analyze(argv[1], argv[2])))
    elif argv[:1] == ["--analyze"] and len(argv) == 3:
        print(analyze_table(argv[1], argv[2]))
    elif len(argv) <= 1 and all(a.isdigit() for a in argv):
        print(workloads(int(argv[0]) if argv else 10))
    else:
        sys.exit(__doc__)
