"""Compiled vs reference speed of the mftx ops (pytest-benchmark).

Run (a few minutes; one run, on a quiet machine):

    pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-json=bench.json -p no:cacheprovider
    python benchmarks/summarize.py bench.json

Every case is one benchmark group holding the compiled kernel ("compiled"), its
pure-PyTorch twin ("reference") and, for topk, plain ``torch.topk`` over
``torch.cat`` ("torch", no tie rule, no NaN check) side by side; summarize.py
prints reference/compiled per group. Scores are laid out like BERT-base's
analysed weights: 12 layers x (4 x 768x768, 3072x768, 768x3072) = 72 tensors,
84,934,656 entries, repeated/truncated to the size of the case.

`test_topk_memory_85m` measures the peak extra resident memory of one topk over
the 85M scores in a fresh subprocess per case (``python bench_ops.py --memory``).

Two builds of the kernels, side by side over the same 85M inputs (calls of the raw
modules, alternating, the fastest of ROUNDS: on a shared machine the noise only adds; the mftx.ops._C of this checkout against another
build's ``_C*.so``, e.g. one copied out of site-packages before a change):

    python benchmarks/bench_ops.py --compare-build OTHER/_C.cpython-311-x86_64-linux-gnu.so [ROUNDS]
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import pytest
import torch

import mftx.ops as ops
from mftx.ops import reference

BERT_BASE_SHAPES = [
    shape for _ in range(12) for shape in [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
]
BERT_BASE_NUMEL = 84_934_656
assert sum(a * b for a, b in BERT_BASE_SHAPES) == BERT_BASE_NUMEL and len(BERT_BASE_SHAPES) == 72

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "85M": BERT_BASE_NUMEL}
KS = [100, 10_000, 1_000_000]
MASK_SIZES = [10_000, 1_000_000]
TARGET_S = 2.0  # measured time per benchmark, roughly (at least 3 rounds)

needs_cpp = pytest.mark.skipif(not ops.HAS_CPP, reason=f"no compiled ops: {ops.IMPORT_ERROR}")


def bert_layout(total: int):
    """Shapes of BERT-base's analysed weights, cycled, the last one cut to fit `total`."""
    shapes, left = [], total
    for shape in itertools.cycle(BERT_BASE_SHAPES):
        if left == 0:
            return shapes
        n = shape[0] * shape[1]
        if n <= left:
            shapes.append(shape)
            left -= n
        else:
            shapes.append((left,))
            left = 0


@cache
def scores(total: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g) for s in bert_layout(total)]
    if scale != 1.0:
        for t in out:
            t.mul_(scale)
    return tuple(out)


def run(benchmark, fn, *args, **extra):
    """Benchmark fn(*args): about TARGET_S of rounds, at least 3, after one warm-up call."""
    benchmark.extra_info.update(
        extra, threads=ops.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")
    )
    if benchmark.disabled:
        return benchmark(fn, *args)
    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    rounds = min(100, max(3, int(TARGET_S / max(dt, 1e-6))))
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)
    return out


def torch_topk(tensors, k):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return torch.topk(flat, min(k, flat.numel()), sorted=True)


TOPK = {"compiled": ops.topk, "reference": reference.topk, "torch": torch_topk}


def impl_params(names):
    return [pytest.param(n, marks=needs_cpp) if n == "compiled" else n for n in names]


@pytest.mark.parametrize("impl", impl_params(["compiled", "reference", "torch"]))
@pytest.mark.parametrize("k", KS, ids=lambda k: f"k={k}")
@pytest.mark.parametrize("size", list(SIZES), ids=lambda s: f"n={s}")
def test_topk(benchmark, size, k, impl):
    xs = scores(SIZES[size])
    benchmark.group = f"topk n={size} k={k:,}"
    if impl == "compiled":
        assert ops.uses_cpp(xs)
    out = run(benchmark, TOPK[impl], xs, k, impl=impl, n=SIZES[size], k=k)
    assert len(out[0] if impl == "torch" else out) == min(k, SIZES[size])


@pytest.mark.parametrize("impl", impl_params(["compiled", "reference"]))
@pytest.mark.parametrize("k", KS, ids=lambda k: f"k~{k}")
@pytest.mark.parametrize("size", list(SIZES), ids=lambda s: f"n={s}")
def test_select(benchmark, size, k, impl):
    """Entries below the threshold that about k of the standard-normal scores fall under."""
    n = SIZES[size]
    xs = scores(n)
    threshold = float(torch.special.ndtri(torch.tensor(min(k / n, 1.0), dtype=torch.float64)))
    benchmark.group = f"select n={size} ~{k:,} below"
    fn = ops.select if impl == "compiled" else reference.select
    out = run(benchmark, fn, xs, threshold, impl=impl, n=n, threshold=threshold)
    benchmark.extra_info["selected"] = len(out)


@pytest.mark.parametrize("impl", impl_params(["compiled", "reference"]))
def test_toward_zero(benchmark, impl):
    """First-order rule over 85M weights and gradients (about half the entries qualify)."""
    params = scores(BERT_BASE_NUMEL, seed=1, scale=0.05)
    grads = scores(BERT_BASE_NUMEL, seed=2, scale=1e-3)
    benchmark.group = "toward_zero n=85M"
    fn = ops.toward_zero if impl == "compiled" else reference.toward_zero
    out = run(benchmark, fn, params, grads, 1.0, impl=impl, n=BERT_BASE_NUMEL)
    benchmark.extra_info["selected"] = len(out)


@cache
def mask_candidates():
    """The 1M lowest-scoring entries of the 85M scores: spread over all 72 tensors."""
    return ops.topk(scores(BERT_BASE_NUMEL), MASK_SIZES[-1], largest=False)


@pytest.mark.parametrize("impl", impl_params(["compiled", "reference"]))
@pytest.mark.parametrize("m", MASK_SIZES, ids=lambda m: f"m={m}")
@pytest.mark.parametrize("which", ["mask_", "restore_"])
def test_mask_restore(benchmark, which, m, impl):
    """mask_ (or restore_) of m entries of the 85M weights; the other op runs untimed."""
    ws = list(scores(BERT_BASE_NUMEL, seed=1, scale=0.05))
    c = mask_candidates()[:m]
    mask_, restore_ = (
        (ops.mask_, ops.restore_)
        if impl == "compiled"
        else (
            reference.mask_,
            reference.restore_,
        )
    )
    if impl == "compiled":
        assert ops.uses_cpp(ws)
    checksum = [t.sum() for t in ws]
    benchmark.group = f"{which} m={m:,} of 85M"
    benchmark.extra_info.update(impl=impl, m=m, threads=ops.get_num_threads())
    pending = []  # values saved by the last timed mask_, restored before the next round

    def undo():
        while pending:
            restore_(ws, c, pending.pop())

    if which == "mask_":

        def setup():
            undo()

        def target():
            pending.append(mask_(ws, c))

    else:

        def setup():
            return (ws, c, mask_(ws, c)), {}

        target = restore_

    if not benchmark.disabled:  # calibrate: about TARGET_S of rounds
        args = setup()
        t0 = time.perf_counter()
        target(*(args[0] if args else ()))
        dt = time.perf_counter() - t0
        rounds = min(200, max(5, int(TARGET_S / max(dt, 1e-6))))
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    else:
        benchmark.pedantic(target, setup=setup)
    undo()
    assert all(torch.equal(t.sum(), s) for t, s in zip(ws, checksum))


# ------------------------------------------------------------------ memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(impl: str, k: int) -> dict:
    """Peak resident memory one topk over the 85M scores adds (run in a fresh process)."""
    xs = scores(BERT_BASE_NUMEL)
    fn = ops.topk if impl == "compiled" else reference.topk
    fn([t[:1] for t in xs[:4]], 2)  # start the thread pool, load lazily loaded code
    try:  # reset the peak (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _rss_kib("VmRSS")
    hwm_before = _rss_kib("VmHWM")
    out = fn(xs, k)
    peak = _rss_kib("VmHWM")
    extra_kib = peak - before
    return {
        "impl": impl,
        "k": k,
        "n": BERT_BASE_NUMEL,
        "threads": ops.get_num_threads(),
        "data_mib": BERT_BASE_NUMEL * 4 / 2**20,
        "rss_before_mib": before / 1024,
        "peak_extra_mib": extra_kib / 1024,
        # Without the reset, an older peak can hide the op's: then this is an upper bound.
        "peak_reset": reset or peak > hwm_before,
        "output_mib": len(out) * 20 / 2**20,
    }


@pytest.mark.parametrize("impl", impl_params(["compiled", "reference"]))
@pytest.mark.parametrize("k", [10_000, 1_000_000], ids=lambda k: f"k={k}")
def test_topk_memory_85m(benchmark, impl, k):
    benchmark.group = f"memory: topk n=85M k={k:,}"

    def measure():
        r = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory", impl, str(k)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "MFTX_BENCH_THREADS": str(ops.get_num_threads())},
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    res = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print(f"\n{impl} topk k={k:,} over 85M: peak extra {res['peak_extra_mib']:.1f} MiB")
    if impl == "compiled":
        assert res["peak_reset"]
        # O(k + threads): 16-byte entries, at most 2k + 65,536 per thread and twice that
        # for the merge and sort, plus the output; far below one full-size copy (324 MiB).
        bound = 16 * (2 * k + 65_536) * (res["threads"] + 2) / 2**20 + res["output_mib"] + 16
        assert res["peak_extra_mib"] < min(bound, res["data_mib"] / 2), res


# ------------------------------------------------------------------ two builds


def load_build(path: str):
    """Another build of mftx.ops._C, loaded beside this one (not registered as mftx.ops._C)."""
    spec = importlib.util.spec_from_file_location("mftx_other_build._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_cases():
    """name -> f(module, threads): raw kernel calls over the 85M layout."""
    n = BERT_BASE_NUMEL
    xs = [t.view(-1).numpy() for t in scores(n)]
    params = [t.view(-1).numpy() for t in scores(n, seed=1, scale=0.05)]
    grads = [t.view(-1).numpy() for t in scores(n, seed=2, scale=1e-3)]
    out = {f"topk k={k:,}": (lambda m, nt, k=k: m.topk(xs, k, True, nt)) for k in KS}
    for k in KS:
        thr = float(torch.special.ndtri(torch.tensor(k / n, dtype=torch.float64)))
        out[f"select ~{k:,}"] = lambda m, nt, thr=thr: m.select(xs, thr, True, nt)
    out["toward_zero"] = lambda m, nt: m.toward_zero(params, grads, 1.0, nt)
    for m_ in MASK_SIZES:
        c = mask_candidates()[:m_]
        ti, fi = c.tensor_index.numpy(), c.flat_index.numpy()

        def mask_restore(m, nt, ti=ti, fi=fi):
            t0 = time.perf_counter()
            saved = m.mask(params, ti, fi, nt)
            t1 = time.perf_counter()
            m.restore(params, ti, fi, saved, nt)
            return t1 - t0, time.perf_counter() - t1

        out[f"mask_/restore_ m={m_:,}"] = mask_restore
    return out


def compare_builds(other_path: str, rounds: int = 5) -> str:
    """Markdown table: fastest times of this build and another, alternating per round."""
    from mftx.ops import _compiled

    builds = {"this build": _compiled._C, "other build": load_build(other_path)}
    nt = ops.get_num_threads()
    lines = [
        f"threads {nt}, fastest of {rounds} rounds, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        "",
        "| case | other build | this build | other / this |",
        "|---|---:|---:|---:|",
    ]
    for name, fn in build_cases().items():
        paired = name.startswith("mask_/restore_")
        times = {b: [] for b in builds}
        for m in builds.values():
            fn(m, nt)  # warm-up
        for r in range(rounds):
            order = list(builds) if r % 2 == 0 else list(builds)[::-1]
            for b in order:
                t0 = time.perf_counter()
                out = fn(builds[b], nt)  # mask_/restore_ time their two halves
                times[b].append(out if paired else (time.perf_counter() - t0,))
        for i, what in enumerate(["mask_", "restore_"] if paired else [""]):
            med = {b: min(t[i] for t in times[b]) for b in builds}
            label = name.replace("mask_/restore_", what) if what else name
            lines.append(
                f"| {label} | {med['other build'] * 1e3:.1f} ms | {med['this build'] * 1e3:.1f} ms "
                f"| {med['other build'] / med['this build']:.2f}× |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        if os.environ.get("MFTX_BENCH_THREADS"):
            ops.set_num_threads(int(os.environ["MFTX_BENCH_THREADS"]))
        print(json.dumps(measure_memory(sys.argv[2], int(sys.argv[3]))))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "--compare-build":
        print(compare_builds(sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 5))
    else:
        sys.exit(
            f"usage: {sys.argv[0]} --memory compiled|reference K | --compare-build OTHER_C.so "
            "[ROUNDS]  (benchmarks: see docstring)"
        )
