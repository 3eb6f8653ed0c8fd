"""Scale figures: time and peak memory of mftx's workloads at real model sizes.

Randomly initialised BERT classifiers of the shapes of all-MiniLM-L6-v2, BERT-base
and BERT-large (eager attention, float32, the default parameter selection), one
batch of 8 × 64 tokens. Each workload runs in its own subprocess, so peaks do not
mix: seconds (median of up to 5 runs after a warm-up; a run longer than
``--budget`` is timed once), the ratio to one gradient timed in the same process
right after it (warm, and under the same machine load), peak resident memory
(CPU: VmHWM, reset once the model, batch and inputs are built; CUDA: peak
allocated) and the part of it above them ("extra").

    python benchmarks/bench_scale.py                      # three sizes, CPU, 2 threads
    python benchmarks/bench_scale.py --sizes minilm,bert-base --json scale.json
    python benchmarks/bench_scale.py --device cuda --precision tf32   # see gpu_scale.sh

``--precision tf32`` lets float32 matmuls use TF32; ``bf16`` runs the model under
``torch.autocast(bfloat16)``: products are computed in bf16 while gradients, CG
and Lanczos vectors stay float32 (each such run adds a row with the relative
difference of one product from float32). A Lanczos step is timed twice: as a
plain loop (one Hessian product and a reorthogonalisation against the stored
vectors) and through `mftx.curvature.lanczos` (the engine behind `mftx.spectrum`,
``damping="auto"`` and ``solver="lanczos"``); EK-FAC as one ``solver="ekfac"``
score (fit and solve).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

SIZES: Dict[str, Dict[str, int]] = {
    # hidden, layers, heads, intermediate (vocabulary 30,522 and 512 positions for all)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}  # fmt: skip
DEFAULT_SIZES = ("minilm", "bert-base", "bert-large")
PRECISIONS = ("fp32", "tf32", "bf16")
DAMPING = 0.01
TOPK = 10_000


# ---------------------------------------------------------------- the setting of one child


class Setting:
    """Model, batch, analysed space and options of one size on one device."""

    def __init__(self, size: str, args: argparse.Namespace):
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        import mftx

        self.args = args
        self.device = resolve_device(args.device)
        shape = SIZES[size]
        config = BertConfig(num_labels=2, attn_implementation="eager", **shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            with torch.device(self.device):
                self.model = BertForSequenceClassification(config).eval()
        self.space = mftx.select_params(self.model)
        gen = torch.Generator().manual_seed(1)
        self.batch = {
            "input_ids": torch.randint(1000, config.vocab_size, (args.batch, args.length),
                                       generator=gen),
            "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
            "labels": torch.randint(0, 2, (args.batch,), generator=gen),
        }  # fmt: skip
        self.batch = {k: v.to(self.device) for k, v in self.batch.items()}
        self.loss = mftx.HFClassification()

    def curvature(self, curvature: str = "hessian", mode: str = "rev-rev", cache: bool = False):
        import mftx

        return mftx.Curvature(self.model, self.space, [self.batch], self.loss,
                              curvature=curvature, mode=mode, cache_graphs=cache)  # fmt: skip

    def vector(self, seed: int = 2):
        import torch

        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.space.numel, generator=gen).to(self.device)


def resolve_device(name: str):
    """torch.device(name), refusing CUDA clearly where there is none."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return device


@contextlib.contextmanager
def precision(mode: str, device):
    """fp32: as is; tf32: float32 matmuls may use TF32; bf16: autocast to bfloat16."""
    import torch

    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)  # fmt: skip
    try:
        tf32 = mode == "tf32"
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16"
               else contextlib.nullcontext())  # fmt: skip
        with ctx:
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]


# ---------------------------------------------------------------- workloads


class Unavailable(Exception):
    """The mftx in use lacks the API a workload measures."""


def _gradient(s: Setting) -> Callable[[], Any]:
    op = s.curvature()
    return lambda: op.gradient([s.batch])


def _product(curvature: str, mode: str, cache: bool = False):
    def prepare(s: Setting) -> Callable[[], Any]:
        op = s.curvature(curvature, mode, cache)
        v = s.vector()
        run = lambda: op.matvec(v)  # noqa: E731
        run.warm_up = cache  # the warm-up builds the graph: never timed
        return run

    return prepare


def _cg_iteration(s: Setting) -> Callable[[], Any]:
    from mftx.inverse import solvers

    op = s.curvature("ggn")
    b = s.vector()
    iters = s.args.cg_iters

    def run():
        solvers.cg(op.matvec, b, DAMPING, max_iter=iters, fixed_iterations=True)

    run.per = iters  # seconds are reported per iteration
    return run


def _lanczos_plain(s: Setting) -> Callable[[], Any]:
    """One Lanczos step on the Hessian: a product, the three-term recurrence and a full
    reorthogonalisation against `--lanczos-vectors` stored vectors (random stand-ins:
    the cost does not depend on their values)."""
    import torch

    op = s.curvature()
    j = s.args.lanczos_vectors
    gen = torch.Generator().manual_seed(4)
    Q = torch.randn(j, s.space.numel, generator=gen).to(s.device)
    Q /= torch.linalg.vector_norm(Q, dim=1, keepdim=True)
    q = Q[j - 1]
    q_prev = Q[j - 2] if j > 1 else torch.zeros_like(q)
    beta = 0.5

    def step():
        w = op.matvec(q)
        alpha = torch.dot(w, q)
        w -= alpha * q + beta * q_prev
        for _ in range(2):  # "twice is enough"
            w -= Q.T @ (Q @ w)
        return w / torch.linalg.vector_norm(w)

    return step


def _lanczos_library(s: Setting) -> Callable[[], Any]:
    from mftx.curvature.lanczos import lanczos

    op = s.curvature()
    steps = s.args.lanczos_vectors
    run = lambda: lanczos(op.matvec, s.vector(), steps)  # noqa: E731
    run.per = steps
    return run


def _ekfac_fit(s: Setting) -> Callable[[], Any]:
    import mftx

    batches = [s.batch]
    return lambda: mftx.score(s.model, batches, batches, method="influence", solver="ekfac",
                              params=s.space, damping=DAMPING, progress=False)  # fmt: skip


def _scores(s: Setting):
    import torch

    gen = torch.Generator().manual_seed(3)
    return [torch.randn(p.shape, generator=gen).to(s.device) for p in s.space.params]


def _topk(s: Setting) -> Callable[[], Any]:
    from mftx import ops

    scores = _scores(s)
    return lambda: ops.topk(scores, TOPK)


def _mask_restore(s: Setting) -> Callable[[], Any]:
    from mftx import ops

    tensors = [p.detach() for p in s.space.params]
    cands = ops.topk(_scores(s), TOPK)

    def run():
        saved = ops.mask_(tensors, cands)
        ops.restore_(tensors, cands, saved)

    return run


def _precision_error(s: Setting) -> Callable[[], Any]:
    """Relative difference of one Hessian product in the chosen precision from float32."""
    import torch

    if s.args.precision == "fp32":
        raise Unavailable("runs with --precision tf32 or bf16")
    op = s.curvature()
    v = s.vector()
    with precision("fp32", s.device):  # the reference, outside the outer precision
        with torch.autocast(s.device.type, enabled=False):
            ref = op.matvec(v)

    def run():
        got = op.matvec(v)
        run.extra = {"relative_difference": float(
            torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))}  # fmt: skip

    return run


#: name -> (label, prepare). `prepare(setting)` returns the callable that is timed.
WORKLOADS: Dict[str, Any] = {
    "gradient": ("gradient (one batch)", _gradient),
    "hvp-rev-rev": ("Hessian product, rev-rev", _product("hessian", "rev-rev")),
    "hvp-fwd-rev": ("Hessian product, fwd-rev", _product("hessian", "fwd-rev")),
    "hvp-double-backward": ("Hessian product, double backward",
                            _product("hessian", "double-backward")),
    "hvp-cached": ("Hessian product, cached graph", _product("hessian", "double-backward", True)),
    "ggn-rev-rev": ("GGN product, rev-rev", _product("ggn", "rev-rev")),
    "ggn-fwd-rev": ("GGN product, fwd-rev", _product("ggn", "fwd-rev")),
    "cg-iteration": ("CG iteration (GGN, rev-rev)", _cg_iteration),
    "lanczos-plain": ("Lanczos step, plain loop (1 HVP + reorthogonalisation)", _lanczos_plain),
    "lanczos": ("Lanczos step (mftx.curvature.lanczos: 1 HVP + full reorthogonalisation)", _lanczos_library),
    "ekfac": ("EK-FAC fit + solve (score, solver='ekfac')", _ekfac_fit),
    "topk": (f"top-k, k = {TOPK:,}, over the analysed parameters", _topk),
    "mask-restore": (f"mask_ + restore_ of {TOPK:,} entries", _mask_restore),
    "precision-error": ("product vs float32: relative difference", _precision_error),
}  # fmt: skip


# ---------------------------------------------------------------- measuring, in the child


def _rss_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> Optional[int]:
    """Reset the peak to the current RSS; returns the baseline (None: not on this OS)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _rss_status()["VmRSS"]
    except OSError:
        return None


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(size: str, name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Build the setting; time the workload (warm-up, then timed runs) and then one gradient
    (the reference, in this process, warm and under the same load); seconds, ratio, peaks."""
    import torch

    torch.set_num_threads(args.threads)
    s = Setting(size, args)
    label, prepare = WORKLOADS[name]
    row: Dict[str, Any] = {"size": size, "workload": name, "label": label,
                           "total_params": s.space.model_numel,
                           "analysed_params": s.space.numel}  # fmt: skip
    cuda = s.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with precision(args.precision, s.device):
        try:
            fn = prepare(s)
        except Unavailable as why:
            return {**row, "available": False, "why": str(why)}
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(s.device)
            base = torch.cuda.memory_allocated(s.device)
        else:
            base = _reset_peak()
        times: List[float] = []
        deadline = time.perf_counter() + args.budget
        for i in range(1 + args.max_repeats):
            dt = _timed(fn, sync)
            # A long first run counts (no time to repeat it), unless it only warms up.
            if i > 0 or (dt > args.budget and not getattr(fn, "warm_up", False)):
                times.append(dt)
            if times and time.perf_counter() + dt > deadline:
                break
        if cuda:
            peak = torch.cuda.max_memory_allocated(s.device)
        else:
            peak = _rss_status().get("VmHWM") if base is not None else None
        per, extra = getattr(fn, "per", 1), getattr(fn, "extra", {})
        del fn  # its operators, graphs and vectors
        gc.collect()
        gradient = _timed(_gradient(s), sync)  # after the workload: warm, outside its peak
    seconds = statistics.median(times) / per
    return {
        **row, "available": True, "seconds": seconds, "gradient_seconds": gradient,
        "ratio": seconds / gradient, "runs": len(times), "peak_bytes": peak, "base_bytes": base,
        "extra_bytes": None if peak is None or base is None else peak - base,
        "device": str(s.device), "precision": args.precision, "threads": args.threads,
        **extra,
    }  # fmt: skip


# ---------------------------------------------------------------- the parent: one child each

#: (flag, type, default, help) of the options children inherit.
OPTIONS = [
    ("--device", str, "cpu", "cpu, cuda, cuda:1, ..."),
    ("--precision", str, "fp32", f"one of {', '.join(PRECISIONS)}"),
    ("--threads", int, 2, "torch threads (CPU)"),
    ("--batch", int, 8, "rows per batch"),
    ("--length", int, 64, "tokens per row"),
    ("--budget", float, 10.0, "seconds of timed runs per workload (a longer run is timed once)"),
    ("--max-repeats", int, 5, "timed runs at most, after the warm-up"),
    ("--cg-iters", int, 2, "CG iterations timed per run"),
    ("--lanczos-vectors", int, 4, "stored vectors each Lanczos step reorthogonalises against"),
]


def _child_args(args: argparse.Namespace) -> List[str]:
    out = []
    for flag, _, _, _ in OPTIONS:
        out += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
    return out


def run_one(size: str, name: str, args: argparse.Namespace) -> Dict[str, Any]:
    if args.inline:
        return measure(size, name, args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", size, name, *_child_args(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}"
            why += " (out of memory?)" if proc.returncode == -9 else ""
        else:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            why = f"failed (exit {proc.returncode}): {tail}"
        return {"size": size, "workload": name, "label": WORKLOADS[name][0],
                "available": False, "why": why}  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(b: Optional[int]) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def format_table(rows: List[Dict[str, Any]], sizes: List[str]) -> str:
    """Side by side: per workload and size, seconds, × the gradient timed in the same process
    just before, and peak / extra GiB (extra: above the model, batch and inputs)."""
    by = {(r["size"], r["workload"]): r for r in rows}
    head = ["workload"] + [f"{sz}: s (× gradient), peak / extra GiB" for sz in sizes]
    lines = ["| " + " | ".join(head) + " |", "| :-- |" + " --: |" * len(sizes)]
    for name, (label, _) in WORKLOADS.items():
        if not any((sz, name) in by for sz in sizes):
            continue
        cells = [label]
        for sz in sizes:
            r = by.get((sz, name))
            if r is None:
                cells.append("")
            elif not r["available"]:
                cells.append(f"not available ({r['why']})")
            elif name == "precision-error":
                cells.append(f"{r['relative_difference']:.1e}")
            else:
                cells.append(f"{_fmt_s(r['seconds'])} ({r['ratio']:.2f}×), "
                             f"{_gib(r['peak_bytes'])} / {_gib(r['extra_bytes'])}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_s(t: float) -> str:
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default=",".join(DEFAULT_SIZES), help=f"comma-separated, of {', '.join(SIZES)}"
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)}",
    )
    for flag, kind, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument(
        "--inline", action="store_true", help="run in this process (quick checks; peaks then mix)"
    )
    p.add_argument("--child", nargs=2, metavar=("SIZE", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # fmt: skip
    args.sizes = [x for x in args.sizes.split(",") if x]
    args.workloads = [x for x in args.workloads.split(",") if x]
    for kind, names, known in (("size", args.sizes, SIZES), ("workload", args.workloads,
                                                              WORKLOADS)):  # fmt: skip
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"unknown {kind}(s) {bad}; one of {list(known)}")
    if args.precision not in PRECISIONS:
        p.error(f"--precision must be one of {PRECISIONS}")
    if args.lanczos_vectors < 1 or args.cg_iters < 1 or args.max_repeats < 1:
        p.error("--lanczos-vectors, --cg-iters and --max-repeats must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return []
    resolve_device(args.device)
    rows = []
    t0 = time.perf_counter()
    for size in args.sizes:
        for name in args.workloads:
            row = run_one(size, name, args)
            rows.append(row)
            done = (f"{_fmt_s(row['seconds'])}, peak {_gib(row['peak_bytes'])} GiB"
                    if row["available"] and "seconds" in row else row.get("why", ""))  # fmt: skip
            print(f"[{time.perf_counter() - t0:6.0f} s] {size} {name}: {done}", file=sys.stderr)
    print(f"device {args.device}, precision {args.precision}, {args.threads} threads, "
          f"batch {args.batch} x {args.length} tokens")  # fmt: skip
    for size in args.sizes:
        r = next((r for r in rows if r["size"] == size and "analysed_params" in r), None)
        if r:
            vec = r["analysed_params"] * 4
            print(f"{size}: {r['total_params']:,} parameters, {r['analysed_params']:,} analysed "
                  f"(one float32 vector {vec / 2**30:.2f} GiB)")  # fmt: skip
    print(format_table(rows, args.sizes))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"},
                       "rows": rows}, fh, indent=2)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
