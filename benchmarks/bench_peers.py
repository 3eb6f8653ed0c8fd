"""mftx beside the libraries a user would pick instead, on the same work, in one process.

    python benchmarks/bench_peers.py --model minilm --json peers-minilm.json
    python benchmarks/bench_peers.py --model tiny --check-only          # CI: agreement only
    python benchmarks/bench_peers.py --table before=b1.json before=b2.json after=a1.json \
        --out docs/benchmarks-peers.md          # the page: ratios side by side per label

docs/benchmarks-peers.md is generated this way from benchmarks/results/*.json (the
"before" runs: main at 417fc14, run from a snapshot of its mftx/ with this script).

Each job runs both sides on the same model, batches, analysed parameters, loss and
damping: first their answers are compared (a mismatch beyond the job's tolerance
fails the run, exit status 1), then their times, alternating mftx and the peer and
keeping the minimum of `--rounds` rounds, one thread (``torch.set_num_threads(1)``).

Jobs (``--jobs``, comma-separated; all by default):

- ``ekfac``: EK-FAC fit of the Fisher (sampled and empirical) and the preconditioned
  validation gradient, mftx ``solver="ekfac"`` against kronfluence 1.0.1
  (``fit_all_factors``; its preconditioner applied with its own ``Ekfac`` factor config);
  also each fit's matmul FLOPs.
  kronfluence's sampled Fisher redraws labels in its own task; for the agreement check
  both use the labels mftx drew.
- ``solvers``: CG on H + λ_pd I (λ_pd: mftx's auto damping, H + λI positive definite),
  MINRES on H + λI, and CG on G + λI (GGN), a fixed number of iterations, mftx's
  solvers on `mftx.Curvature` against scipy's ``cg`` / ``minres`` on curvlinops 3.0.1's
  ``HessianLinearOperator`` / ``GGNLinearOperator`` (+ λI); time per iteration. mftx
  runs with its default products (``rev-rev``) and with cached first-order graphs
  (``cache_graphs=True``). Also three right-hand sides in one solve against three
  separate solves (mftx only: no peer solves several systems at once), and MINRES
  with the Lanczos basis kept (``reorthogonalize=True``) against plain MINRES.
- ``spectrum``: λ_max, λ_min and the trace of the Hessian on one batch, `mftx.spectrum`
  against PyHessian 0.1 (power iteration, Hutchinson). PyHessian has no λ_min (its
  power iteration finds the largest |λ| only) and no error bound. On the tiny model a
  dense eigendecomposition is the oracle.
- ``ablation`` (mftx only): what single changes bought, each against the path it
  replaced: float32 against float64 EK-FAC eigenbases, one Gram-Schmidt pass of the
  Lanczos reorthogonalisation against two, three stacked vectors in one curvature
  product against three products; and each product's cost in gradients.
- ``flops``: the matmul-family FLOPs (``torch.utils.flop_counter``) of one curvature
  product on each side, Hessian and GGN, mftx rev-rev and cached against curvlinops
  (which recomputes the forward and first backward pass in every product) and the
  cached one against PyHessian (which keeps its graph, as mftx's cached mode does):
  the floor under the per-iteration time ratios while both sides run the same kernels.

Written for a CPU; nothing here is a test (tests/test_bench_peers.py checks the logic).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import mftx
import mftx.data
import mftx.models
from mftx.curvature import spectra
from mftx.inverse import ekfac, solvers

JOBS = ("ekfac", "solvers", "spectrum", "ablation", "flops")


# ---------------------------------------------------------------------------- setup


class Logits(torch.nn.Module):
    """An HF classifier as ``inputs dict -> logits`` (what the peers call)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(**x).logits


def _inputs(b):
    return {k: v for k, v in b.items() if k != "labels"}


def setup(model_name: str, n_train: int, n_val: int, batch: int, max_length: int):
    """(model, train batches, val batches, space, dtype) for 'minilm' or 'tiny'."""
    if model_name == "minilm":
        model, tok = mftx.models.load_classifier("minilm", seed=0)
        dtype = torch.float32
    else:
        from mftx.data import make_batches

        words = "good great fine bad awful dull the film is a movie and story very it was".split()
        tmp = Path(tempfile.mkdtemp(prefix="mftx-peers-"))
        path = mftx.models.make_tiny_bert(tmp / "tiny", words, hidden_size=16, intermediate=32)
        model, tok = mftx.models.load_classifier(str(path), seed=0)
        dtype = torch.float64
        model = model.to(dtype)
    model.eval()
    data = os.environ.get("MFTX_DATA")
    if model_name == "minilm" or (data and Path(data, "train.tsv").is_file()):
        sst = mftx.data.load_sst2(data, train_size=n_train, seed=0, tokenizer=tok,
                                  max_length=max_length)  # fmt: skip
        train = sst.train_batches(batch, shuffle=False, pad_to="max_length")
        rows = list(sst.dev[:n_val])
        val = make_val(rows, tok, batch, max_length)
    else:  # tiny, no SST-2 at hand: seeded sentences
        rng = torch.Generator().manual_seed(0)
        words_ = "good great fine bad awful dull the film is a movie".split()

        def rows_(n):
            out = []
            for _ in range(n):
                idx = torch.randint(len(words_), (6,), generator=rng).tolist()
                out.append(
                    (" ".join(words_[i] for i in idx), int(torch.randint(2, (1,), generator=rng)))
                )
            return out

        train = make_batches(rows_(n_train), tok, batch_size=batch, max_length=max_length,
                             shuffle=False, pad_to="max_length")  # fmt: skip
        val = make_val(rows_(n_val), tok, batch, max_length)
    space = mftx.select_params(model)
    return model, train, val, space, dtype


def make_val(rows, tok, batch, max_length):
    from mftx.data import make_batches

    return make_batches(rows, tok, batch_size=batch, max_length=max_length, shuffle=False,
                        pad_to="max_length")  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _per(t: Optional[float], n: int) -> Optional[float]:
    return None if t is None else t / n


class Timer:
    """Alternating rounds, minimum per side."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def pair(self, ours: Callable[[], Any], peer: Optional[Callable[[], Any]]):
        if self.rounds == 0:  # agreement only
            return None, None
        best_o, best_p = math.inf, math.inf
        for _ in range(self.rounds):
            t0 = time.perf_counter()
            ours()
            best_o = min(best_o, time.perf_counter() - t0)
            if peer is not None:
                t0 = time.perf_counter()
                peer()
                best_p = min(best_p, time.perf_counter() - t0)
        return best_o, (best_p if peer is not None else None)


class Report:
    """Agreement figures and time ratios, as rows of a JSON document."""

    def __init__(self, meta: Dict[str, Any]):
        self.meta = meta
        self.agreement: List[Dict[str, Any]] = []
        self.timing: List[Dict[str, Any]] = []
        self.arithmetic: List[Dict[str, Any]] = []
        self.notes: List[str] = []

    def agree(self, job: str, what: str, value: float, limit: float, kind: str = "max") -> None:
        """`value` must be <= `limit` (kind "max") or >= it ("min")."""
        ok = value <= limit if kind == "max" else value >= limit
        if not math.isfinite(value):
            ok = False
        self.agreement.append({"job": job, "what": what, "value": value, "limit": limit,
                               "kind": kind, "ok": bool(ok)})  # fmt: skip
        print(f"[{'ok' if ok else 'MISMATCH'}] {job}: {what} = {value:.3g} "
              f"({'<=' if kind == 'max' else '>='} {limit:g})", flush=True)  # fmt: skip

    def time(self, job: str, what: str, ours: float, peer: Optional[float], unit: str,
             peer_name: str, **extra) -> None:  # fmt: skip
        if ours is None:
            return
        ratio = ours / peer if peer else None
        self.timing.append({"job": job, "what": what, "mftx_s": ours, "peer_s": peer,
                            "ratio": ratio, "unit": unit, "peer": peer_name, **extra})  # fmt: skip
        r = f"{ratio:.2f}x" if ratio is not None else "n/a"
        p = f"{peer:.4g} s" if peer is not None else "n/a"
        print(f"[time] {job}: {what}: mftx {ours:.4g} s, {peer_name} {p} per {unit}: {r}",
              flush=True)  # fmt: skip

    def flops(self, job: str, what: str, ours: float, peer: float, peer_name: str) -> None:
        """Matmul-family FLOPs of one piece of work on each side (deterministic)."""
        ratio = ours / peer if peer else None
        self.arithmetic.append({"job": job, "what": what, "mftx_gflop": ours / 1e9,
                                "peer_gflop": peer / 1e9, "ratio": ratio,
                                "peer": peer_name})  # fmt: skip
        r = f"{ratio:.3f}x" if ratio is not None else "n/a"
        print(f"[flops] {job}: {what}: mftx {ours / 1e9:.4g} GFLOP, {peer_name} "
              f"{peer / 1e9:.4g} GFLOP: {r}", flush=True)  # fmt: skip

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[note] {text}", flush=True)

    @property
    def ok(self) -> bool:
        return all(a["ok"] for a in self.agreement)

    def to_json(self) -> Dict[str, Any]:
        return {"meta": self.meta, "agreement": self.agreement, "timing": self.timing,
                "arithmetic": self.arithmetic, "notes": self.notes, "ok": self.ok}  # fmt: skip


# ---------------------------------------------------------------------------- EK-FAC


def _kronfluence_task(space_modules: List[str]):
    import torch.nn.functional as F
    from kronfluence.task import Task

    class ClsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**_inputs(batch)).logits
            labels = batch["sampled_labels"] if sample else batch["labels"]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(**_inputs(batch)).logits
            return F.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return space_modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ClsTask()


class _Rows(torch.utils.data.Dataset):
    """The rows of a list of equal-length batches, for kronfluence's DataLoader."""

    def __init__(self, batches):
        self.rows = []
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                self.rows.append({k: v[i] for k, v in b.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def job_ekfac(rep: Report, model, train, val, space, dtype, timer: Timer, tight: bool):
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.factor.config import FactorConfig
    from kronfluence.utils.constants import (
        ACTIVATION_EIGENVECTORS_NAME,
        GRADIENT_EIGENVECTORS_NAME,
        LAMBDA_MATRIX_NAME,
        NUM_LAMBDA_PROCESSED,
    )

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    obj = mftx.HFClassification()
    blocks = ekfac.linear_blocks(model, space)
    modules = [b.module for b in blocks]
    g_val, _ = mftx.Curvature(model, space, val, obj).gradient(val)
    batch = train[0]["input_ids"].shape[0]
    sampled = ekfac.sampled_batches(model, train, obj, seed=0)
    rows = _Rows([{**b, "sampled_labels": s["labels"]} for b, s in zip(train, sampled)])
    kmodel = prepare_model(copy.deepcopy(model), _kronfluence_task(modules))
    out = tempfile.mkdtemp(prefix="kronfluence-")
    analyzer = Analyzer("bench", kmodel, _kronfluence_task(modules), cpu=True,
                        disable_tqdm=True, output_dir=out, log_level=logging.ERROR)  # fmt: skip
    f64 = torch.float64
    # float64 everywhere kronfluence allows it when the model is float64 (the tight check).
    prec = f64 if dtype == f64 else torch.float32
    fargs = {
        fisher: FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=fisher == "empirical",
            activation_covariance_dtype=prec,
            gradient_covariance_dtype=prec,
            per_sample_gradient_dtype=prec,
            lambda_dtype=prec,
            eigendecomposition_dtype=f64,
        )
        for fisher in ekfac.FISHERS
    }

    def k_fit(fisher):
        analyzer.fit_all_factors(fisher, rows, per_device_batch_size=batch,
                                 factor_args=fargs[fisher], overwrite_output_dir=True)  # fmt: skip

    def k_precondition(fisher, damping):
        factors = analyzer.load_all_factors(fisher)
        cfg = FactorConfig.CONFIGS["ekfac"]
        sargs = ScoreArguments(damping_factor=damping, precondition_dtype=f64)
        parts = list(torch.split(g_val, space.numels))
        out = torch.zeros_like(g_val, dtype=f64)
        outs = list(torch.split(out, space.numels))
        for b in blocks:
            storage = {
                name: factors[name][b.module]
                for name in (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME,
                             LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED)
            }  # fmt: skip
            cfg.prepare(storage, sargs, torch.device("cpu"))
            cols = [parts[b.weight].reshape(b.d_out, b.d_in)]
            if b.bias is not None:
                cols.append(parts[b.bias].reshape(b.d_out, 1))
            G = torch.cat(cols, 1).to(f64)[None]
            R = cfg.precondition_gradient(G, storage)[0]
            outs[b.weight].copy_(R[:, : b.d_in].reshape(-1))
            if b.bias is not None:
                outs[b.bias].copy_(R[:, -1])
        return out

    fits = {}
    for fisher in ekfac.FISHERS:
        fits[fisher] = ekfac.fit(model, space, train, obj, fisher=fisher, seed=0)
        k_fit(fisher)
        lam = fits[fisher].eigenvalues()
        damping = 0.1 * float(lam.mean())  # kronfluence's heuristic scale, one global λ
        ours = fits[fisher].solve(g_val, damping)
        theirs = k_precondition(fisher, damping)
        limit = 1e-10 if tight else 1e-3  # float32 covariances on kronfluence's side
        rep.agree("ekfac", f"{fisher} Fisher: preconditioned gradient, relative difference "
                  f"(λ = 0.1 × mean Λ = {damping:.3g})", rel(ours, theirs), limit)  # fmt: skip
        rep.agree("ekfac", f"{fisher} Fisher: cosine", cosine(ours, theirs), 1 - 1e-6, "min")
    for fisher in ekfac.FISHERS:  # eigendecompositions are not matmuls: not counted
        rep.flops("ekfac", f"fit, {fisher} Fisher (matmuls; eigendecompositions not counted)",
                  count_flops(lambda f=fisher: ekfac.fit(model, space, train, obj, fisher=f,
                                                         seed=0)),
                  count_flops(lambda f=fisher: k_fit(f)), "kronfluence 1.0.1")  # fmt: skip
    for fisher in ekfac.FISHERS:
        t_o, t_p = timer.pair(
            lambda f=fisher: ekfac.fit(model, space, train, obj, fisher=f, seed=0),
            lambda f=fisher: k_fit(f),
        )
        rep.time("ekfac", f"fit, {fisher} Fisher", t_o, t_p, "fit", "kronfluence 1.0.1")
    damping = 0.1 * float(fits["sampled"].eigenvalues().mean())
    t_o, t_p = timer.pair(lambda: fits["sampled"].solve(g_val, damping),
                          lambda: k_precondition("sampled", damping))  # fmt: skip
    rep.time("ekfac", "precondition one gradient (kronfluence: load + prepare + apply)", t_o,
             t_p, "gradient", "kronfluence 1.0.1")  # fmt: skip


# ---------------------------------------------------------------------------- solvers


def _curvlinops_operator(model, train, space, curvature: str, damping: float):
    import curvlinops
    from curvlinops._torch_base import PyTorchLinearOperator

    class Scaled(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self, like, lam):
            super().__init__(like._in_shape, like._out_shape)
            self.like, self.lam = like, lam

        def _matmat(self, X):
            return [self.lam * x for x in X]

        def _adjoint(self):
            return self

        @property
        def dtype(self):
            return self.like.dtype

        @property
        def device(self):
            return self.like.device

    data = [(_inputs(b), b["labels"]) for b in train]
    cls = (
        curvlinops.HessianLinearOperator if curvature == "hessian" else curvlinops.GGNLinearOperator
    )
    H = cls(Logits(model), torch.nn.CrossEntropyLoss(), list(space.params), data,
            check_deterministic=False, batch_size_fn=lambda x: x["input_ids"].shape[0])  # fmt: skip
    return H + Scaled(H, damping) if damping else H


class Counted:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, v):
        self.n += 1
        return self.fn(v)


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def _scipy_solve(kind: str, A, b: torch.Tensor, iters: int) -> Tuple[torch.Tensor, int]:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, cg, minres

    dt = np.float64 if b.dtype == torch.float64 else np.float32
    op = A.to_scipy(dtype=dt)
    counted = Counted(op.matvec)
    lin = LinearOperator(op.shape, matvec=counted, dtype=dt)
    rhs = b.detach().cpu().numpy().astype(dt)
    if kind == "cg":
        x, _ = cg(lin, rhs, rtol=0.0, atol=0.0, maxiter=iters)
    else:
        x, _ = minres(lin, rhs, rtol=0.0, maxiter=iters)
    return torch.from_numpy(np.asarray(x)).to(b.dtype), counted.n


def job_solvers(rep: Report, model, train, val, space, dtype, timer: Timer, tight: bool,
                iters: int, lam_pd: float):  # fmt: skip
    obj = mftx.HFClassification()
    g_val, _ = mftx.Curvature(model, space, val, obj).gradient(val)
    cases = [("cg", "hessian", lam_pd), ("minres", "hessian", 0.01), ("cg", "ggn", 0.01)]
    for kind, curv, lam in cases:
        name = f"{kind.upper()} on {'H' if curv == 'hessian' else 'G'} + {lam:.3g} I"
        peer = _curvlinops_operator(model, train, space, curv, lam)
        ops = {
            "rev-rev": mftx.Curvature(model, space, train, obj, curvature=curv),
            "cached": mftx.Curvature(model, space, train, obj, curvature=curv,
                                     mode="double-backward", cache_graphs=True),
        }  # fmt: skip
        solve = solvers.cg if kind == "cg" else solvers.minres
        kw = {"on_negative_curvature": "stop"} if kind == "cg" else {}
        if _accepts(solve, "true_residual"):  # per iteration: no final check (scipy has none)
            kw["true_residual"] = False
        results = {}
        for label, op in ops.items():
            results[label] = solve(op.matvec, g_val, lam, tol=0.0, max_iter=iters, **kw)
        x_peer, n_peer = _scipy_solve(kind, peer, g_val, iters)
        res = results["rev-rev"]
        if res.negative_curvature:
            rep.note(f"{name}: mftx CG met non-positive curvature at iteration "
                     f"{res.first_negative[0]}: the comparison is not meaningful")  # fmt: skip
        limit = 1e-8 if tight else 2e-2
        rep.agree("solvers", f"{name}: {iters} iterations, x relative to scipy + curvlinops",
                  rel(res.x, x_peer), limit)  # fmt: skip
        rep.agree("solvers", f"{name}: cached-graph products against rev-rev, x",
                  rel(results["cached"].x, res.x), limit)  # fmt: skip
        for label, op in ops.items():
            op.n_matvec = 0
            t_o, t_p = timer.pair(
                lambda op=op: solve(op.matvec, g_val, lam, tol=0.0, max_iter=iters, **kw),  # noqa: B023
                lambda: _scipy_solve(kind, peer, g_val, iters),  # noqa: B023
            )
            n_o = op.n_matvec / max(timer.rounds, 1)
            rep.time("solvers", f"{name}, mftx {label}", _per(t_o, iters), _per(t_p, iters),
                     "iteration", "curvlinops 3.0.1 + scipy",
                     mftx_products=n_o, peer_products=n_peer)  # fmt: skip
            op.release()

    if not _accepts(solvers.minres, "reorthogonalize"):
        rep.note("several right-hand sides and reorthogonalised MINRES: not in this version")
        return
    # Several right-hand sides in one solve (no peer does this): three gradients.
    thirds = [val[i::3] or val for i in range(3)]
    rhs = torch.stack([mftx.Curvature(model, space, v, obj).gradient(v)[0] for v in thirds])
    for kind, curv, lam in (("minres", "hessian", 0.01), ("cg", "ggn", 0.01)):
        for label, kw in (("rev-rev", {}), ("cached", {"mode": "double-backward",
                                                        "cache_graphs": True})):  # fmt: skip
            op = mftx.Curvature(model, space, train, obj, curvature=curv, **kw)
            solve = solvers.cg if kind == "cg" else solvers.minres
            many = solve(op.matvec, rhs, lam, tol=0.0, max_iter=iters)
            worst = max(rel(r.x, solve(op.matvec, b, lam, tol=0.0, max_iter=iters).x)
                        for r, b in zip(many, rhs))  # fmt: skip
            rep.agree("solvers", f"{kind.upper()} on {curv}, {label}: 3 right-hand sides in one "
                      "solve against 3 separate solves, worst x", worst,
                      1e-8 if tight else 1e-3)  # fmt: skip
            t_o, t_p = timer.pair(
                lambda: solve(op.matvec, rhs, lam, tol=0.0, max_iter=iters),  # noqa: B023
                lambda: [solve(op.matvec, b, lam, tol=0.0, max_iter=iters) for b in rhs],  # noqa: B023
            )
            rep.time("solvers", f"{kind.upper()} on {curv}, {label}: 3 right-hand sides", t_o,
                     t_p, "3 solves", "mftx, 3 separate solves")  # fmt: skip
            op.release()

    # MINRES keeping its Lanczos basis against plain MINRES (same products).
    op = mftx.Curvature(model, space, train, obj, mode="double-backward", cache_graphs=True)
    plain = solvers.minres(op.matvec, g_val, 0.01, tol=0.0, max_iter=iters)
    ortho = solvers.minres(op.matvec, g_val, 0.01, tol=0.0, max_iter=iters, reorthogonalize=True)
    rep.note(f"MINRES {iters} iterations on H + 0.01 I: true relative residual plain "
             f"{plain.true_residual:.3g}, reorthogonalised {ortho.true_residual:.3g}")  # fmt: skip
    t_o, t_p = timer.pair(
        lambda: solvers.minres(op.matvec, g_val, 0.01, tol=0.0, max_iter=iters,
                               reorthogonalize=True),
        lambda: solvers.minres(op.matvec, g_val, 0.01, tol=0.0, max_iter=iters),
    )  # fmt: skip
    rep.time("solvers", "MINRES reorthogonalised against plain MINRES (cached products)",
             _per(t_o, iters), _per(t_p, iters), "iteration", "mftx plain MINRES")  # fmt: skip
    op.release()


# ---------------------------------------------------------------------------- spectrum


def job_spectrum(rep: Report, model, train, val, space, dtype, timer: Timer, tight: bool,
                 oracle: bool):  # fmt: skip
    from pyhessian import hessian as PyHessian

    obj = mftx.HFClassification()
    one = [train[0]]  # PyHessian's single-batch mode (its graph is built once)
    analysed = {id(p) for p in space.params}
    frozen = [p for p in model.parameters() if id(p) not in analysed and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # PyHessian differentiates every parameter that requires grad
    crit = torch.nn.CrossEntropyLoss()
    data = (_inputs(one[0]), one[0]["labels"])
    try:

        def pyh_top(tol=1e-3, max_iter=100):
            torch.manual_seed(0)
            h = PyHessian(Logits(model), crit, data=data, cuda=False)
            return h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)[0][0]

        def pyh_trace(n):
            torch.manual_seed(0)
            h = PyHessian(Logits(model), crit, data=data, cuda=False)
            return h.trace(maxIter=n, tol=0.0)

        like = space.flatten(space.detached())

        def ours(mode, cache, tol=1e-3):
            op = mftx.Curvature(model, space, one, obj, mode=mode, cache_graphs=cache)
            try:
                return spectra.estimate(op.matvec, like, steps=80, tol=tol, probes=1)
            finally:
                op.release()

        def ours_top(mode, cache, tol):
            """The largest-|λ| Ritz value alone (value, n_matvec)."""
            from types import SimpleNamespace

            from mftx.curvature.lanczos import lanczos, largest_magnitude, rademacher

            op = mftx.Curvature(model, space, one, obj, mode=mode, cache_graphs=cache)
            try:
                run = lanczos(op.matvec, rademacher(like.numel(), 0, like), 80, tol=tol,
                              wanted=largest_magnitude(1))  # fmt: skip
                theta = run.ritz()[0]
                lead = float(theta[theta.abs().argmax()])
                return SimpleNamespace(value=lead, n_matvec=run.n_matvec)
            finally:
                op.release()

        spec = ours("rev-rev", False)
        spec_c = ours("double-backward", True)
        top = pyh_top()
        by_mag = sorted(spec.ritz_values, key=abs, reverse=True)
        lead = by_mag[0]
        gap = 1 - abs(by_mag[1]) / abs(lead) if len(by_mag) > 1 else 1.0
        if gap >= 0.5:
            rep.agree("spectrum", "largest |λ|: PyHessian power iteration relative to mftx Lanczos",
                      abs(top - lead) / abs(lead), 2e-2)  # fmt: skip
        else:
            rep.note(f"no agreement check against PyHessian here: the two largest |Ritz values| of "
                     f"mftx's run, {by_mag[0]:.4g} and {by_mag[1]:.4g}, are within {gap:.0%} of "
                     "each other, where power iteration converges at their ratio and its stopping "
                     f"rule (relative change < 1e-3) says nothing of its error; it stopped at "
                     f"{top:.4g}, {abs(top - lead) / abs(lead):.1%} off mftx's")  # fmt: skip
        rep.agree("spectrum", "cached-graph spectrum against rev-rev, λ_max and λ_min (relative)",
                  max(abs(spec_c.lambda_max - spec.lambda_max) / abs(spec.lambda_max),
                      abs(spec_c.lambda_min - spec.lambda_min) / abs(spec.lambda_max)),
                  1e-8 if tight else 1e-3)  # fmt: skip
        rep.note(f"mftx: λ_min {spec.lambda_min:.6g} ± {spec.lambda_min_error:.1e}, λ_max "
                 f"{spec.lambda_max:.6g} ± {spec.lambda_max_error:.1e} ({spec.n_matvec} products); "
                 f"PyHessian: top eigenvalue {top:.6g}, no λ_min, no error bound")  # fmt: skip
        if oracle:
            op = mftx.Curvature(model, space, one, obj)
            ev = torch.linalg.eigvalsh(op.dense().double())
            scale = float(ev.abs().max())
            for name, got, bound, true in (
                ("λ_max", spec.lambda_max, spec.lambda_max_error, float(ev[-1])),
                ("λ_min", spec.lambda_min, spec.lambda_min_error, float(ev[0])),
            ):
                rep.agree("spectrum", f"oracle: mftx {name} off the dense eigendecomposition, "
                          "relative to the spectral radius (Lanczos tol 1e-3)",
                          abs(got - true) / scale, 1e-3)  # fmt: skip
                rep.agree("spectrum", f"oracle: mftx {name} error / its own error bound",
                          abs(got - true) / max(bound, 1e-300), 1.0)  # fmt: skip
            top_true = float(ev[-1]) if abs(ev[-1]) >= abs(ev[0]) else float(ev[0])
            rep.note(f"oracle: PyHessian's top eigenvalue is {abs(top - top_true) / scale:.2e} "
                     "off the dense one (relative to the spectral radius)")  # fmt: skip
            tr = float(ev.sum())
            n_tr = 30
            samples = pyh_trace(n_tr)
            s_mftx = mftx.spectrum(model, one, params=space, probes=n_tr, probe_steps=2,
                                   progress=False, steps=2)  # fmt: skip
            rep.note(f"oracle: trace {tr:.6g}; Hutchinson over {n_tr} Rademacher vectors: mftx "
                     f"{s_mftx.trace:.6g} ± {s_mftx.trace_std:.2g}, PyHessian "
                     f"{sum(samples) / len(samples):.6g}")  # fmt: skip
        t_o, t_p = timer.pair(lambda: ours("rev-rev", False), pyh_top)
        rep.time("spectrum", "λ_min and λ_max (mftx, rev-rev) against the top eigenvalue "
                 "(PyHessian), tol 1e-3", t_o, t_p, "estimate", "PyHessian 0.1",
                 mftx_products=spec.n_matvec)  # fmt: skip
        t_o, t_p = timer.pair(lambda: ours("double-backward", True), pyh_top)
        rep.time("spectrum", "λ_min and λ_max (mftx, cached graphs) against the top eigenvalue "
                 "(PyHessian), tol 1e-3", t_o, t_p, "estimate", "PyHessian 0.1",
                 mftx_products=spec_c.n_matvec)  # fmt: skip
        # Equal accuracy: mftx stops once its error bounds (guarantees) reach PyHessian's
        # actual error, measured against mftx's tol-1e-3 estimate.
        err = abs(top - lead) / abs(lead)
        if err > 1e-3:
            spec_e = ours("double-backward", True, tol=err)
            t_o, t_p = timer.pair(lambda: ours("double-backward", True, tol=err), pyh_top)
            rep.time("spectrum", "λ_min and λ_max (mftx, cached graphs) to PyHessian's own error "
                     "(Lanczos tol = its relative error) against the top eigenvalue (PyHessian)",
                     t_o, t_p, "estimate", "PyHessian 0.1", mftx_products=spec_e.n_matvec,
                     tol=err)  # fmt: skip
        # The fair form of PyHessian's job: the largest |λ| alone, both sides to the same
        # actual accuracy. PyHessian's power iteration gets a tight stopping rule (relative
        # change < 1e-6, at most 200 iterations); its error is measured against a tight
        # Lanczos value; mftx's Lanczos then stops once its error bound on the largest-|λ|
        # Ritz value (a guarantee) is within that error.
        ref = ours_top("double-backward", True, 1e-7)
        pyh_tight = lambda: pyh_top(tol=1e-6, max_iter=200)  # noqa: E731
        top_t = pyh_tight()
        err_t = abs(abs(top_t) - abs(ref.value)) / abs(ref.value)
        rep.note(f"largest |λ|: tight Lanczos {ref.value:.8g} ({ref.n_matvec} products); "
                 f"PyHessian with relative change < 1e-6 (≤ 200 iterations) {top_t:.8g}, "
                 f"{err_t:.1e} off")  # fmt: skip
        tol_e = max(err_t, 1e-7)
        run_e = ours_top("double-backward", True, tol_e)
        rep.agree("spectrum", "largest |λ|: mftx Lanczos to PyHessian's achieved error, its "
                  "value off the tight one (relative)",
                  abs(run_e.value - ref.value) / abs(ref.value), max(2 * tol_e, 1e-6))  # fmt: skip
        t_o, t_p = timer.pair(lambda: ours_top("double-backward", True, tol_e), pyh_tight)
        rep.time("spectrum", "largest |λ| only, both to the same accuracy: mftx Lanczos (cached "
                 "graphs, stops at its bound) against PyHessian's power iteration (relative "
                 "change < 1e-6)", t_o, t_p, "estimate", "PyHessian 0.1",
                 mftx_products=run_e.n_matvec, tol=tol_e)  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------- ablation


def job_ablation(rep: Report, model, train, val, space, dtype, timer: Timer):
    """What single changes bought, each against the path it replaced (mftx only)."""
    from mftx.curvature import lanczos as lz

    obj = mftx.HFClassification()
    if hasattr(ekfac, "_eigenbasis"):

        def fit32():
            return ekfac.fit(model, space, train, obj, fisher="sampled", seed=0,
                             eigh_dtype=torch.float32)  # fmt: skip

        def fit64():
            return ekfac.fit(model, space, train, obj, fisher="sampled", seed=0)

        g, _ = mftx.Curvature(model, space, val, obj).gradient(val)
        a, b = fit32(), fit64()
        for share in (0.1, 1.0):
            lam = share * float(b.eigenvalues().mean())
            rep.note(f"EK-FAC with float32 eigenbases (eigh_dtype=float32, not the default): "
                     f"preconditioned gradient {rel(a.solve(g, lam), b.solve(g, lam)):.2g} "
                     f"relative off the float64 one at λ = {share:g} × mean Λ")  # fmt: skip
        t_o, t_p = timer.pair(fit32, fit64)
        rep.time("ablation", "EK-FAC fit: eigenbases of large factors in float32 (opt-in) "
                 "against float64 (the default)", t_o, t_p, "fit", "mftx, float64 eigh")  # fmt: skip
    # One Gram-Schmidt pass against 30 basis vectors of the analysed size, against two.
    n = space.numel
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, 30, generator=gen, dtype=dtype))[0].T.contiguous()
    w = torch.randn(n, generator=gen, dtype=dtype)
    chunks = [Q[:16], Q[16:]]
    t_o, t_p = timer.pair(lambda: lz._project_out(w, chunks, 30),
                          lambda: lz._project_out(lz._project_out(w, chunks, 30), chunks, 30))  # fmt: skip
    rep.time("ablation", "Lanczos reorthogonalisation against 30 vectors: one pass (DGKS: the "
             "second only when needed) against always two", t_o, t_p, "step",
             "mftx, two passes")  # fmt: skip
    # k = 3 stacked products against three single products.
    V = torch.randn(3, n, generator=gen, dtype=dtype)
    for label, kw in (("rev-rev", {}), ("cached", {"mode": "double-backward",
                                                    "cache_graphs": True})):  # fmt: skip
        for curv in ("hessian", "ggn"):
            op = mftx.Curvature(model, space, train, obj, curvature=curv, **kw)
            op.matvec(V[0])
            t_o, t_p = timer.pair(lambda: op.matvec(V), lambda: [op.matvec(v) for v in V])  # noqa: B023
            rep.time("ablation", f"{curv} products, {label}: 3 stacked vectors in one product "
                     "against 3 products", t_o, t_p, "3 products", "mftx, one at a time")  # fmt: skip
            op.release()
    g1, _ = mftx.Curvature(model, space, train, obj).gradient(train)
    t_g, _ = timer.pair(lambda: mftx.Curvature(model, space, train, obj).gradient(train), None)
    for label, kw in (("rev-rev", {}), ("cached", {"mode": "double-backward",
                                                    "cache_graphs": True})):  # fmt: skip
        for curv in ("hessian", "ggn"):
            op = mftx.Curvature(model, space, train, obj, curvature=curv, **kw)
            op.matvec(g1)
            t_o, _ = timer.pair(lambda: op.matvec(g1), None)  # noqa: B023
            if t_o is not None:
                rep.note(f"{curv} product, {label}: {t_o / t_g:.2f}× a gradient of the same loss "
                         f"and batches ({t_o:.3g} s against {t_g:.3g} s)")  # fmt: skip
            op.release()


# ---------------------------------------------------------------------------- flops


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul-family FLOPs (mm, bmm, addmm, …) that `fn` runs, counted per aten call with
    torch's own formulas (``torch.utils.flop_counter.flop_registry``). Not FlopCounterMode
    itself: its module tracking hooks break curvlinops' nested ``autograd.grad``.
    Elementwise work is not counted: on these models the matmuls are most of the time."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Count():
        fn()
    return Count.total


def job_flops(rep: Report, model, train, space):
    """The arithmetic of one curvature product on each side: the floor under any time ratio.

    A per-iteration solver ratio cannot fall much below the ratio of the products'
    arithmetic while both sides run the same kernels; this says where that floor is."""
    from pyhessian import hessian as PyHessian

    obj = mftx.HFClassification()
    gen = torch.Generator().manual_seed(0)
    like = space.flatten(space.detached())
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype)
    grad_flops = count_flops(lambda: mftx.Curvature(model, space, train, obj).gradient(train))
    for curv in ("hessian", "ggn"):
        peer = _curvlinops_operator(model, train, space, curv, 0.0)
        peer_flops = count_flops(lambda: peer @ v)  # noqa: B023
        for label, kw in (("rev-rev", {}), ("cached", {"mode": "double-backward",
                                                        "cache_graphs": True})):  # fmt: skip
            op = mftx.Curvature(model, space, train, obj, curvature=curv, **kw)
            op.matvec(v)  # builds the kept graphs (once per solve, not per product)
            ours = count_flops(lambda: op.matvec(v))  # noqa: B023
            op.release()
            rep.flops("flops", f"{curv} product over the training batches, mftx {label}",
                      ours, peer_flops, "curvlinops 3.0.1")  # fmt: skip
            rep.note(f"{curv} product, mftx {label}: {ours / grad_flops:.3g}× the matmul FLOPs "
                     f"of a gradient of the same loss and batches; curvlinops "
                     f"{peer_flops / grad_flops:.3g}×")  # fmt: skip
    # Several right-hand sides: what a product of 3 stacked vectors shares.
    V = torch.randn((3, *like.shape), generator=gen, dtype=like.dtype)
    for label, kw in (("rev-rev", {}), ("cached", {"mode": "double-backward",
                                                    "cache_graphs": True})):  # fmt: skip
        op = mftx.Curvature(model, space, train, obj, **kw)
        op.matvec(V[0])
        stacked = count_flops(lambda: op.matvec(V))  # noqa: B023
        single = count_flops(lambda: [op.matvec(x) for x in V])  # noqa: B023
        op.release()
        rep.flops("flops", f"hessian products of 3 stacked vectors, mftx {label}, against 3 "
                  "products one at a time", stacked, single, "mftx, one at a time")  # fmt: skip
    # PyHessian keeps its first-order graph too: its product is mftx's cached one.
    one = [train[0]]
    analysed = {id(p) for p in space.params}
    frozen = [p for p in model.parameters() if id(p) not in analysed and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        h = PyHessian(Logits(model), torch.nn.CrossEntropyLoss(),
                      data=(_inputs(one[0]), one[0]["labels"]), cuda=False)  # fmt: skip
        vs = [t.clone() for t in space.unflatten(v)]
        by_id = {id(p): i for i, p in enumerate(h.params)}
        order = [by_id[id(p)] for p in space.params]
        vs_h = [None] * len(vs)
        for i, j in enumerate(order):
            vs_h[j] = vs[i]
        from pyhessian.utils import hessian_vector_product

        peer_flops = count_flops(lambda: hessian_vector_product(h.gradsH, h.params, vs_h))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    op = mftx.Curvature(model, space, one, obj, mode="double-backward", cache_graphs=True)
    op.matvec(v)
    ours = count_flops(lambda: op.matvec(v))
    op.release()
    rep.flops("flops", "hessian product on one batch, mftx cached (PyHessian keeps its graph too)",
              ours, peer_flops, "PyHessian 0.1")  # fmt: skip


# ---------------------------------------------------------------------------- table


def _jobs_text() -> List[str]:
    doc = __doc__.split("Jobs (")[1].split("\n\n", 1)[1].split("\n\nWritten for")[0]
    return doc.splitlines()


def table(runs: List[Tuple[str, Dict[str, Any]]], notes: Optional[List[str]] = None) -> str:
    """Markdown: agreement and timing of each labelled run (e.g. before / after)."""
    out = ["# mftx beside its peers", "",
           "Generated by `benchmarks/bench_peers.py --table` from the JSON each run wrote; "
           "reproduce a run with the command in its row. Ratios are mftx / peer (below 1: "
           "mftx is faster), each side the minimum of alternating rounds in one process, "
           "one thread.", "",
           "What runs (from the script's docstring):", "",
           *_jobs_text(), ""]  # fmt: skip
    if notes:
        out += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    labels = list(dict.fromkeys(label for label, _ in runs))
    ratios: Dict[Tuple[str, str], Dict[str, Optional[float]]] = {}
    for label, run in runs:
        for t in run["timing"]:
            ratios.setdefault((t["job"], t["what"]), {})[label] = t["ratio"]
    if ratios:
        out += ["## Ratios (mftx / peer)", "",
                "| job | work | " + " | ".join(labels) + " |",
                "| :-- | :-- | " + " | ".join("--:" for _ in labels) + " |"]  # fmt: skip
        for (job, what), by in ratios.items():
            cells = [f"{by[x]:.2f}×" if by.get(x) is not None else "–" for x in labels]
            out.append(f"| {job} | {what} | " + " | ".join(cells) + " |")
        out.append("")
    flops = [(label, a) for label, run in runs for a in run.get("arithmetic", [])]
    if flops:
        out += ["## Arithmetic (matmul-family GFLOP)", "",
                "| run | work | mftx | peer | peer GFLOP | mftx / peer |",
                "| :-- | :-- | --: | :-- | --: | --: |"]  # fmt: skip
        for label, a in flops:
            r = f"{a['ratio']:.3f}" if a["ratio"] is not None else "n/a"
            out.append(f"| {label} | {a['what']} | {a['mftx_gflop']:.4g} | {a['peer']} | "
                       f"{a['peer_gflop']:.4g} | {r} |")  # fmt: skip
        out.append("")
    for label, run in runs:
        m = run["meta"]
        out += [f"## {label}", "",
                f"- command: `{m['command']}`",
                f"- commit {m.get('commit')}, {m['model']} ({m['analysed']:,} analysed "
                f"parameters, {m['dtype']}), {m['n_train']} training rows in batches of "
                f"{m['batch']} × {m['max_length']} tokens, {m['n_val']} validation rows",
                f"- torch {m['torch']}, {m['threads']} thread(s), {m['machine']}, "
                f"{m['rounds']} rounds"
                + (f", load average {m['load_average_start']} at the start and "
                   f"{m['load_average_end']} at the end (a shared machine)"
                   if "load_average_end" in m else ""),
                f"- agreement: {'all within their limits' if run['ok'] else 'MISMATCH'}", "",
                "| job | agreement | value | limit |", "| :-- | :-- | --: | --: |"]  # fmt: skip
        for a in run["agreement"]:
            lim = ("≤ " if a["kind"] == "max" else "≥ ") + f"{a['limit']:g}"
            out.append(f"| {a['job']} | {a['what']} | {a['value']:.3g} | {lim} |")
        if run["timing"]:
            out += ["", "| job | work | mftx (s) | peer | peer (s) | per | mftx / peer | "
                    "products (mftx / peer, a run) |",
                    "| :-- | :-- | --: | :-- | --: | :-- | --: | --: |"]  # fmt: skip
            for t in run["timing"]:
                p = f"{t['peer_s']:.4g}" if t["peer_s"] is not None else "n/a"
                r = f"{t['ratio']:.2f}×" if t["ratio"] is not None else "n/a"
                mp, pp = t.get("mftx_products"), t.get("peer_products")
                prod = f"{mp:g} / {pp:g}" if mp is not None and pp is not None else (
                    f"{mp:g}" if mp is not None else "")  # fmt: skip
                out.append(f"| {t['job']} | {t['what']} | {t['mftx_s']:.4g} | {t['peer']} | {p} "
                           f"| {t['unit']} | {r} | {prod} |")  # fmt: skip
        if run["notes"]:
            out += [""] + [f"- {n}" for n in run["notes"]]
        out.append("")
    return "\n".join(out)


def _commit() -> Optional[str]:
    import subprocess

    if os.environ.get("MFTX_BENCH_COMMIT"):  # a run from a snapshot outside the repository
        return os.environ["MFTX_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("minilm", "tiny"), default="tiny")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="solver iterations (tiny 20, MiniLM 5)")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="tokens (tiny 16, MiniLM 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-only", action="store_true", help="agreement only, no timing")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--table",
        nargs="+",
        default=None,
        help="LABEL=FILE.json ...: the markdown table of these runs (a label may "
        "repeat: one run per job); ratios side by side per label",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--note",
        action="append",
        default=None,
        help="with --table: a line of prose for the page's notes (no figures)",
    )
    args = ap.parse_args(argv)
    if args.table:
        runs = []
        for item in args.table:
            label, _, path = str(item).rpartition("=")
            runs.append((label or Path(path).stem, json.loads(Path(path).read_text())))
        text = table(runs, args.note)
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="kronfluence")
    tiny = args.model == "tiny"
    iters = args.iters or (20 if tiny else 5)
    length = args.max_length or (16 if tiny else 64)
    model, train, val, space, dtype = setup(
        args.model, args.n_train, args.n_val, args.batch, length
    )
    if tiny:  # a space small enough for the dense oracle: the first layer's attention
        space = mftx.select_params(model, include=[r"layer\.0\.attention"])
    meta = {
        "command": "python benchmarks/bench_peers.py " + " ".join(argv or sys.argv[1:]),
        "commit": _commit(), "model": args.model, "analysed": space.numel,
        "dtype": str(dtype).replace("torch.", ""), "n_train": args.n_train, "n_val": args.n_val,
        "batch": args.batch, "max_length": length, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "iters": iters,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }  # fmt: skip
    meta["load_average_start"] = round(os.getloadavg()[0], 2)
    rep = Report(meta)
    timer = Timer(0 if args.check_only else args.rounds)
    jobs = [j for j in args.jobs.split(",") if j]
    bad = set(jobs) - set(JOBS)
    if bad:
        ap.error(f"unknown jobs {sorted(bad)}; choose from {JOBS}")
    lam_pd = None
    if "solvers" in jobs:
        op = mftx.Curvature(model, space, train, mftx.HFClassification())
        like = space.flatten(space.detached())
        lam_pd = spectra.estimate(op.matvec, like, steps=60, tol=1e-3, probes=1).auto_damping()
        rep.note(f"λ_pd = mftx's auto damping of H over the training batches = {lam_pd:.4g}")
    if "ekfac" in jobs:
        job_ekfac(rep, model, train, val, space, dtype, timer, tiny)
    if "solvers" in jobs:
        job_solvers(rep, model, train, val, space, dtype, timer, tiny, iters, lam_pd)
    if "spectrum" in jobs:
        job_spectrum(rep, model, train, val, space, dtype, timer, tiny, oracle=tiny)
    if "ablation" in jobs:
        job_ablation(rep, model, train, val, space, dtype, timer)
    if "flops" in jobs:
        job_flops(rep, model, train, space)
    meta["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(rep.to_json(), indent=1))
    print("agreement:", "ok" if rep.ok else "MISMATCH", flush=True)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
