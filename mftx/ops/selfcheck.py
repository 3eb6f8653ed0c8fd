"""`mftx selfcheck`: run every op on the compiled and the reference path, compare, time."""

from __future__ import annotations

import time
from typing import Callable, List

import torch

from .. import ops


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _bert_like(total: int, seed: int) -> List[torch.Tensor]:
    """Tensors shaped like BERT-base's analysed weights, truncated to `total` entries."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    out, n, i = [], 0, 0
    while n < total:
        rows, cols = shapes[i % len(shapes)]
        rows = min(rows, max(1, (total - n) // cols))
        t = torch.randn(rows, cols, generator=gen) * 0.05
        out.append(t)
        n += t.numel()
        i += 1
    return out


def run(size: int = 4_000_000) -> int:
    if ops.HAS_CPP:
        from ._compiled import _C

        omp = "with OpenMP" if _C.has_openmp() else "without OpenMP (one thread)"
        print(f"mftx.ops: compiled module loaded: True (built for mftx {_C.__version__}, {omp})")
    else:
        print(f"mftx.ops: compiled module loaded: False ({ops.IMPORT_ERROR})")
    print(f"threads: {ops.get_num_threads()}; scores: {size:,} float32 in BERT-base shapes\n")
    scores = _bert_like(size, 0)
    grads = _bert_like(size, 1)
    k = 10_000
    cases = [
        ("topk", lambda m: m.topk(scores, k)),
        ("select", lambda m: m.select(scores, -0.1)),
        ("toward_zero", lambda m: m.toward_zero(scores, grads, 2e-5 * 1e4)),
    ]
    failures = 0
    print(f"{'op':<14}{'compiled':>12}{'reference':>12}{'speed-up':>10}  same result")
    for name, call in cases:
        ref = call(ops.reference)
        got = call(ops)
        same = got.equal(ref)
        failures += not same
        tc = _time(lambda call=call: call(ops)) if ops.HAS_CPP else float("nan")
        tr = _time(lambda call=call: call(ops.reference))
        print(
            f"{name:<14}{tc * 1e3:>10.2f}ms{tr * 1e3:>10.2f}ms{tr / tc:>9.1f}x  {same} ({len(got):,} entries)"
        )
    cands = ops.topk(scores, k)
    before = [t.clone() for t in scores]
    for path, mod in (("compiled", ops), ("reference", ops.reference)):
        saved = mod.mask_(scores, cands)
        zeroed = all(float(scores[t].view(-1)[f]) == 0 for t, f, _ in cands[:100])
        mod.restore_(scores, cands, saved)
        exact = all(
            torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(scores, before)
        )
        failures += not (zeroed and exact)
        print(f"mask_/restore_ ({path}): zeroed {zeroed}, restored bit for bit {exact}")

    def roundtrip(mod):
        s = mod.mask_(scores, cands)
        mod.restore_(scores, cands, s)

    tc, tr = _time(lambda: roundtrip(ops)), _time(lambda: roundtrip(ops.reference))
    print(
        f"{'mask+restore':<14}{tc * 1e3:>10.2f}ms{tr * 1e3:>10.2f}ms{tr / tc:>9.1f}x  ({k:,} entries)"
    )
    print("\nselfcheck " + ("passed" if failures == 0 else f"FAILED ({failures})"))
    return 0 if failures == 0 else 1
