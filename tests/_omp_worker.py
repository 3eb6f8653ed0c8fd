"""Worker for test_ops_omp.py: every compiled op against its reference twin, bit for bit,
under whatever OpenMP settings the environment holds.

    python _omp_worker.py EXPECTED THREADS [serial] [concurrent] [nested] [torch-busy]

EXPECTED is a safetensors file of the reference results (`write_expected`, computed
once by the test module). THREADS goes to `mftx.ops.set_num_threads`. The modes:
``serial`` runs every case once; ``concurrent`` runs them from several Python threads
at once (the ops release the GIL, so their OpenMP teams overlap); ``nested`` calls
them from every thread of an OpenMP parallel region opened through libgomp's
``GOMP_parallel`` (the ops' own regions are then nested: one thread each unless
``OMP_MAX_ACTIVE_LEVELS`` allows more); ``torch-busy`` adds a thread that keeps
torch's intra-op pool working during ``concurrent``. Prints one JSON line: the
OpenMP settings seen and every mismatch (none: passed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
import threading
from typing import Callable, Dict, List

import torch
from safetensors.torch import load_file, save_file

import mftx.ops as ops
from mftx.ops import Candidates, reference


def data():
    """Scores over 6 grains of the kernels (so 6 pieces of work), weights, and ties."""
    g = torch.Generator().manual_seed(0)
    scores = [
        torch.randn(300, 500, generator=g),
        torch.randn(0, 7),
        torch.randn(150_001, generator=g),
        torch.randn(100, 1000, generator=g),
        torch.tensor(0.25),
    ]
    scores[2][::9973] = float("inf")
    scores[0].view(-1)[::7919] = -0.0
    weights = [torch.randn(t.shape, generator=g) * 0.05 for t in scores]
    grads = [torch.randn(t.shape, generator=g) * 0.05 for t in scores]
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, float("inf")])
    ties = [pool[torch.randint(0, len(pool), t.shape, generator=g)] for t in scores]
    top = reference.topk(scores, 100_000)
    # Candidates above the grain, in rank order, with 30,000 duplicates.
    cands = Candidates(
        *(torch.cat([getattr(top, k), getattr(top, k)[:30_000]]) for k in top.to_dict())
    )
    return {"scores": scores, "weights": weights, "grads": grads, "ties": ties, "cands": cands}


def cases(d) -> Dict[str, Callable[[object], Candidates]]:
    """name -> f(module): the same call on `mftx.ops` and on `mftx.ops.reference`."""
    s, t = d["scores"], d["ties"]
    return {
        "topk k=5": lambda m: m.topk(s, 5),
        "topk k=5000 smallest": lambda m: m.topk(s, 5000, largest=False),  # radix sort
        "topk k=100000": lambda m: m.topk(s, 100_000),  # sampled threshold
        "topk k=70000 ties": lambda m: m.topk(t, 70_000),  # the sample misleads: fallback
        "topk k=all": lambda m: m.topk(s, 10**9, largest=False),
        "select ~1%": lambda m: m.select(s, -2.3),
        "select ~half": lambda m: m.select(s, 0.0, below=False),
        "select ties": lambda m: m.select(t, 1.0),
        "toward_zero": lambda m: m.toward_zero(d["weights"], d["grads"], 0.5),
    }


def write_expected(path) -> None:
    """The reference twins' results for every case, saved for the workers."""
    d = data()
    out = {}
    for name, fn in cases(d).items():
        out.update({f"{name}.{k}": v for k, v in fn(reference).to_dict().items()})
    ws = [w.clone() for w in d["weights"]]
    out["mask_.saved"] = reference.mask_(ws, d["cands"])
    out.update({f"mask_.after.{i}": w.contiguous() for i, w in enumerate(ws)})
    save_file(out, str(path))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def check_all(d, expected) -> List[str]:
    """Runs every case once on the compiled path; returns the mismatches."""
    bad = []
    for name, fn in cases(d).items():
        try:
            got = fn(ops)
        except Exception as exc:  # reported, not raised: threads and callbacks
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not got.equal(Candidates.from_dict(expected, prefix=f"{name}.")):
            bad.append(f"{name}: {len(got)} entries differ from the reference")
    ws = [w.clone() for w in d["weights"]]  # each caller masks its own copy
    saved = ops.mask_(ws, d["cands"])
    if not torch.equal(bits(saved), bits(expected["mask_.saved"])):
        bad.append("mask_: saved values differ")
    after = [expected[f"mask_.after.{i}"] for i in range(len(ws))]
    if not all(torch.equal(bits(a), bits(b)) for a, b in zip(ws, after)):
        bad.append("mask_: masked weights differ")
    ops.restore_(ws, d["cands"], saved)
    if not all(torch.equal(bits(a), bits(b)) for a, b in zip(ws, d["weights"])):
        bad.append("restore_: weights not restored bit for bit")
    return bad


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

    def busy():  # torch's intra-op pool at work meanwhile
        a = torch.randn(384, 384)
        while not stop.is_set():
            (a @ a).sum()
            torch.sort(a.view(-1))

    threads = [threading.Thread(target=lambda: bad.extend(fn())) for _ in range(n)]
    if torch_busy:
        threads.append(threading.Thread(target=busy))
    for t in threads:
        t.start()
    for t in threads[:n]:
        t.join()
    stop.set()
    threads[-1].join()
    return bad


def run_nested(fn: Callable[[], List[str]], gomp, outer: int):
    """fn() from every thread of an OpenMP region of `outer` threads (GOMP_parallel)."""
    bad: List[str] = []
    levels: List[int] = []
    lock = threading.Lock()

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_):  # ctypes takes the GIL around this call; the ops release it again
        try:
            level, out = gomp.omp_get_level(), fn()
        except BaseException as exc:  # nothing may escape into the OpenMP runtime
            level, out = -1, [f"nested: {type(exc).__name__}: {exc}"]
        with lock:
            levels.append(level)
            bad.extend(out)

    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp.GOMP_parallel(ctypes.cast(body, ctypes.c_void_p), None, outer, 0)
    return bad, levels


def main(argv: List[str]) -> int:
    expected_path, threads, modes = argv[0], argv[1], set(argv[2:])
    assert ops.HAS_CPP, ops.IMPORT_ERROR
    ops.set_num_threads(int(threads))
    gomp = libgomp()
    d = data()
    expected = load_file(expected_path)

    def once() -> List[str]:
        return check_all(d, expected)

    report: dict = {"settings": settings(gomp), "bad": {}}
    if "serial" in modes:
        report["bad"]["serial"] = once()
    if "concurrent" in modes:
        report["bad"]["concurrent"] = run_concurrent(once, 3, "torch-busy" in modes)
    if "nested" in modes:
        report["bad"]["nested"], report["nested_levels"] = run_nested(once, gomp, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
