"""Time per CG iteration and compile time: eager, torch.compile, XLA lazy, XLA + openxla.

Runs in the XLA environment (torch 2.9.0 + torch-xla 2.9.0, see .ci/xla.sh), so
all four backends use the same torch build:

    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/bench_xla.py --models tiny,minilm

Each backend runs fixed-iteration CG on (H + λI) x = g with reverse-over-reverse
HVPs: two 1-iteration solves to warm up (openxla compiles on its first two
calls), a warm 1-iteration solve and a warm (1 + n)-iteration solve; per
iteration = (warm(1+n) − warm(1)) / n, compile ≈ the two warm-ups' excess over
warm(1). Prints a markdown table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")
# Spinning OpenMP workers make any concurrent load cost 100x on 2 cores (measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

try:
    import torch_xla

    torch_xla.device()  # before autograd first runs (see mftx.backends.xla)
except ImportError:  # eager and compile still run
    torch_xla = None

import mftx
from mftx import NegativeCurvatureError
from mftx.backends import xla
from mftx.inverse import solvers


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval(), 8, 32, 1000


def minilm():
    from mftx.models import load_classifier

    model, _ = load_classifier("minilm", seed=0)
    return model.eval(), 16, 64, 20000


def batches(n, bsz, length, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(100, vocab, (bsz, length), generator=gen),
            "attention_mask": torch.ones(bsz, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (bsz,), generator=gen),
        }
        for _ in range(n)
    ]


def run_backend(name, model, data, iters, damping):
    space = mftx.select_params(model)
    sync = None
    if name.startswith("xla"):
        model, data, _, space = xla.prepare(model, data, [], space)
        sync = xla.sync_state
    backend = {"eager": "eager", "compile": "compile", "xla": "eager", "xla+openxla": "openxla"}[
        name
    ]
    op = mftx.Curvature(
        model, space, data, mftx.HFClassification(), backend=backend, check_finite=False
    )
    g = torch.randn(space.numel, generator=torch.Generator().manual_seed(1)).to(space.device)

    def solve(n):
        t0 = time.perf_counter()
        # Timing only: the same graph runs whether or not a step meets negative curvature
        # (fixed-iteration CG keeps the iterate from then on), so a solve that ends on it
        # counts as well; the check reads the device state, which waits for it.
        try:
            res = solvers.cg(
                op.matvec, g, damping, max_iter=n, fixed_iterations=True, sync=sync,
                on_negative_curvature="stop",
            )  # fmt: skip
            res.x.cpu()  # wait for the device
        except NegativeCurvatureError:
            pass
        return time.perf_counter() - t0

    first, second = solve(1), solve(1)
    warm1 = min(solve(1), solve(1))
    warm_n = solve(1 + iters)
    return {
        "backend": name,
        "seconds_per_iteration": (warm_n - warm1) / iters,
        "compile_seconds": max(0.0, first - warm1) + max(0.0, second - warm1),
        "analysed_parameters": space.numel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="tiny,minilm")
    ap.add_argument("--backends", default="eager,compile,xla,xla+openxla")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for mname in args.models.split(","):
        model, bsz, length, vocab = {"tiny": tiny_bert, "minilm": minilm}[mname]()
        data = batches(args.batches, bsz, length, vocab)
        for b in args.backends.split(","):
            if b.startswith("xla") and torch_xla is None:
                continue
            torch._dynamo.reset()
            r = run_backend(b, model, data, args.iters, args.damping)
            r.update(model=mname, batch=f"{args.batches}x{bsz}x{length}")
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\ntorch {torch.__version__}, torch_xla {getattr(torch_xla, '__version__', 'absent')}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| model | batches | backend | s / CG iteration | compile s | vs eager |")
    print("| :-- | :-- | :-- | --: | --: | --: |")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["backend"] == "eager")
        ratio = r["seconds_per_iteration"] / base["seconds_per_iteration"]
        print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['seconds_per_iteration']:.4f} | "
              f"{r['compile_seconds']:.1f} | {ratio:.2f}x |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
