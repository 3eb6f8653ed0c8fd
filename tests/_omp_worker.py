"""Worker for test_ops_omp.py: every compiled op against its reference twin, bit for bit,
under whatever OpenMP settings the environment holds.

    python _omp_worker.py THREADS [serial] [concurrent] [nested] [torch-busy]

THREADS is passed to `mftx.ops.set_num_threads` ("default": follow torch). The modes:
``serial`` runs every case once; ``concurrent`` runs them from several Python threads
at once (the ops release the GIL, so their OpenMP teams overlap and compete for
``OMP_THREAD_LIMIT``); ``nested`` calls them from inside an OpenMP parallel region
opened through libgomp's ``GOMP_parallel`` (the ops' own regions are then nested:
one thread each unless ``OMP_MAX_ACTIVE_LEVELS`` allows more); ``torch-busy`` adds
a thread that keeps torch's intra-op pool working during ``concurrent``.
Prints one JSON line: the OpenMP settings seen and every mismatch (none: passed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
import threading
from typing import Callable, Dict, List, Tuple

import torch

import mftx.ops as ops
from mftx.ops import Candidates, reference

Case = Callable[[object], object]


def data() -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Scores above the kernels' grain (several chunks), weights, and a tie-heavy list."""
    g = torch.Generator().manual_seed(0)
    scores = [
        torch.randn(600, 1000, generator=g),
        torch.randn(0, 7),
        torch.randn(150_001, generator=g),
        torch.randn(300, 500, generator=g),
    ]
    scores[2][::9973] = float("inf")
    scores[0].view(-1)[::7919] = -0.0
    weights = [torch.randn(t.shape, generator=g) * 0.05 for t in scores]
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, float("inf")])
    ties = [pool[torch.randint(0, len(pool), t.shape, generator=g)] for t in scores]
    return scores, weights, ties


def cases(scores, weights, ties) -> Dict[str, Case]:
    """name -> f(module) returning something comparable between ops and ops.reference."""
    grads = [torch.flip(w, [0]) if w.dim() else w for w in weights]
    return {
        "topk k=5": lambda m: m.topk(scores, 5),
        "topk k=5000 smallest": lambda m: m.topk(scores, 5000, largest=False),
        "topk k=200000": lambda m: m.topk(scores, 200_000),  # sampled threshold
        "topk k=100000 ties": lambda m: m.topk(ties, 100_000),  # sample misleads: fallback
        "topk k=all": lambda m: m.topk(scores, 10**9, largest=False),
        "select ~1%": lambda m: m.select(scores, -2.3),
        "select ~half": lambda m: m.select(scores, 0.0, below=False),
        "select ties": lambda m: m.select(ties, 1.0),
        "toward_zero": lambda m: m.toward_zero(weights, grads, 0.5),
    }


def mask_cases(scores, weights) -> Tuple[object, List[torch.Tensor]]:
    """Candidates (above the grain, duplicates included) and the weights they index."""
    top = reference.topk(scores, 150_000)
    dup = top[:70_000]
    c = Candidates(
        torch.cat([top.tensor_index, dup.tensor_index]),
        torch.cat([top.flat_index, dup.flat_index]),
        torch.cat([top.value, dup.value]),
    )
    return c, weights


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def check_all(expected, scores, weights, ties, rounds: int = 1) -> List[str]:
    """Runs every case `rounds` times on the compiled path; returns the mismatches."""
    bad = []
    runs = cases(scores, weights, ties)
    c, _ = mask_cases(scores, weights)
    for _ in range(rounds):
        for name, fn in runs.items():
            try:
                got = fn(ops)
            except Exception as exc:  # reported, not raised: threads and callbacks
                bad.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if not got.equal(expected[name]):
                bad.append(f"{name}: {len(got)} entries differ from the reference")
        ws = [w.clone() for w in weights]  # each caller masks its own copy
        saved = ops.mask_(ws, c)
        if not torch.equal(bits(saved), bits(expected["mask_ saved"])):
            bad.append("mask_: saved values differ")
        if not all(torch.equal(bits(a), bits(b)) for a, b in zip(ws, expected["mask_ after"])):
            bad.append("mask_: masked weights differ")
        ops.restore_(ws, c, saved)
        if not all(torch.equal(bits(a), bits(b)) for a, b in zip(ws, weights)):
            bad.append("restore_: weights not restored bit for bit")
    return bad


def reference_results(scores, weights, ties) -> dict:
    expected = {name: fn(reference) for name, fn in cases(scores, weights, ties).items()}
    c, _ = mask_cases(scores, weights)
    ws = [w.clone() for w in weights]
    expected["mask_ saved"] = reference.mask_(ws, c)
    expected["mask_ after"] = ws
    return expected


def libgomp():
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    return ctypes.CDLL(name)  # already loaded (torch's or the system's): the same runtime


def settings(gomp) -> dict:
    return {
        "thread_limit": gomp.omp_get_thread_limit(),
        "dynamic": bool(gomp.omp_get_dynamic()),
        "max_threads": gomp.omp_get_max_threads(),
        "max_active_levels": gomp.omp_get_max_active_levels(),
        "mftx_threads": ops.get_num_threads(),
    }


def run_concurrent(fn: Callable[[], List[str]], n: int, torch_busy: bool) -> List[str]:
    bad: List[str] = []
    stop = threading.Event()

    def worker():
        bad.extend(fn())

    def busy():  # torch's intra-op pool at work meanwhile
        a = torch.randn(384, 384)
        while not stop.is_set():
            (a @ a).sum()
            torch.sort(a.view(-1))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    side = threading.Thread(target=busy) if torch_busy else None
    if side:
        side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    if side:
        side.join()
    return bad


def run_nested(fn: Callable[[], List[str]], gomp, outer: int) -> Tuple[List[str], List[int]]:
    """fn() from every thread of an OpenMP region of `outer` threads (GOMP_parallel)."""
    bad: List[str] = []
    levels: List[int] = []
    lock = threading.Lock()

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_):  # ctypes takes the GIL around this call; the ops release it again
        try:
            level = gomp.omp_get_level()
            out = fn()
        except BaseException as exc:  # nothing may escape into the OpenMP runtime
            level, out = -1, [f"nested: {type(exc).__name__}: {exc}"]
        with lock:
            levels.append(level)
            bad.extend(out)

    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp.GOMP_parallel(ctypes.cast(body, ctypes.c_void_p), None, outer, 0)
    return bad, levels


def main(argv: List[str]) -> int:
    threads, modes = argv[0], set(argv[1:])
    if threads != "default":
        ops.set_num_threads(int(threads))
    assert ops.HAS_CPP, ops.IMPORT_ERROR
    gomp = libgomp()
    scores, weights, ties = data()
    assert all(ops.uses_cpp(t) for t in (scores, weights, ties))
    expected = reference_results(scores, weights, ties)

    def once() -> List[str]:
        return check_all(expected, scores, weights, ties)

    report: dict = {"settings": settings(gomp), "bad": {}}
    if "serial" in modes:
        report["bad"]["serial"] = once()
    if "concurrent" in modes:
        report["bad"]["concurrent"] = run_concurrent(once, 3, "torch-busy" in modes)
    if "nested" in modes:
        bad, levels = run_nested(once, gomp, 2)
        report["bad"]["nested"] = bad
        report["nested_levels"] = levels
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
