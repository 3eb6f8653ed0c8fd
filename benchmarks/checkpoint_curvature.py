"""Curvature spectra of fine-tuned checkpoints, and the solvers compared on them.

For each checkpoint (a directory `mftx finetune` wrote, e.g. `mftx demo`'s
ckpt-60): the training batches `mftx analyze` would use (its data seed, batch
16, `--train-size` rows), `--hvp-batches` of them drawn as `score(hvp_batches=..,
seed=0)` draws them, the full dev set as validation data, and then

- the spectrum of the Hessian (and with `--ggn` of the GGN): `mftx.spectrum`,
  written to <out>/<checkpoint>-<curvature>.json, densities to <out>/spectra.png;
- with `--solvers`: (H + λI) s = ∇L_val with λ = `--damping` solved by CG (stops
  at negative curvature), MINRES, and CG on H + λ_auto I (damping="auto"),
  each with its products, seconds, the relative residual of the reference
  system (H + λI) that its solution leaves, and how its influence scores'
  top-k agree with MINRES's and with the first-order Taylor score −g ⊙ θ;
  written to <out>/<checkpoint>-solvers.json.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/checkpoint_curvature.py runs/ft/ckpt-60 \
        --data ../shared/data/sst2 --hvp-batches 4 --solvers --out runs/curvature
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mftx
from mftx.core import dist
from mftx.curvature import spectra
from mftx.data import load_sst2, make_batches
from mftx.evaluate import length_sorted
from mftx.inverse import solvers
from mftx.models import load_classifier, read_metadata


def _batches(ckpt: Path, data: str, train_size: int, hvp_batches: int):
    model, tok = load_classifier(str(ckpt))
    seed = int(read_metadata(ckpt).get("seed", 0))
    ds = load_sst2(data, train_size, seed, tokenizer=tok, max_length=64)
    train = ds.train_batches(16, shuffle=True, seed=seed)
    idx = dist.sample_indices(len(train), hvp_batches, 0)
    dev = make_batches(length_sorted(ds.dev, tok), tok, 64, max_length=64)
    return model.eval(), [train[i] for i in idx], dev


def _topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ia = set(torch.topk(-a, k).indices.tolist())  # most negative first: most beneficial
    ib = set(torch.topk(-b, k).indices.tolist())
    return len(ia & ib) / k


def compare_solvers(model, space, train, dev, damping, max_iter, tol, progress):
    obj = mftx.HFClassification()
    op = mftx.Curvature(model, space, train, obj, mode="double-backward", cache_graphs=True)
    val = mftx.Curvature(model, space, dev, obj)
    g, _ = val.gradient(dev)
    theta = space.flatten(space.detached())
    ref = solvers.damped(op.matvec, damping)

    def record(name, x, products, seconds, extra):
        r = float((ref(x) - g).norm() / g.norm())  # one more product, not counted
        return {"solver": name, "products": products, "seconds": seconds,
                "reference_relative_residual": r, "x": x, **extra}  # fmt: skip

    out = []
    n0 = op.n_matvec
    t0 = time.perf_counter()
    res = solvers.cg(op.matvec, g, damping, tol=tol, max_iter=max_iter,
                     on_negative_curvature="stop", progress=progress)  # fmt: skip
    out.append(record("cg", res.x, op.n_matvec - n0, time.perf_counter() - t0,
                      {"reason": res.reason, "iterations": res.iterations}))  # fmt: skip
    n0 = op.n_matvec
    t0 = time.perf_counter()
    res = solvers.minres(op.matvec, g, damping, tol=tol, max_iter=max_iter, progress=progress)
    out.append(record("minres", res.x, op.n_matvec - n0, time.perf_counter() - t0,
                      {"reason": res.reason, "iterations": res.iterations,
                       "residuals": res.residuals}))  # fmt: skip
    n0 = op.n_matvec
    t0 = time.perf_counter()
    spec = spectra.estimate(op.matvec, theta, steps=60, tol=1e-3, probes=1, progress=progress)
    lam = spec.auto_damping()
    res = solvers.cg(op.matvec, g, lam, tol=tol, max_iter=max_iter, progress=progress)
    out.append(record("auto-cg", res.x, op.n_matvec - n0, time.perf_counter() - t0,
                      {"reason": res.reason, "iterations": res.iterations, "damping": lam,
                       "lanczos_products": spec.n_matvec, "residuals": res.residuals}))  # fmt: skip
    best = out[1]["x"]
    taylor = -g * theta
    for o in out:
        x = o.pop("x")
        infl = -theta * x
        o["cosine_to_minres"] = float(torch.dot(x, best) / (x.norm() * best.norm()))
        for k in (100, 1000, 10000):
            o[f"top{k}_overlap_minres"] = _topk_overlap(infl, -theta * best, k)
            o[f"top{k}_overlap_taylor"] = _topk_overlap(infl, taylor, k)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--hvp-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--ggn", action="store_true", help="also the GGN's spectrum")
    p.add_argument("--solvers", action="store_true", help="compare CG, MINRES, auto-damped CG")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for c in args.checkpoints:
        ckpt = Path(c)
        model, train, dev = _batches(ckpt, args.data, args.train_size, args.hvp_batches)
        space = mftx.select_params(model)
        for curv in ["hessian"] + (["ggn"] if args.ggn else []):
            spec = mftx.spectrum(
                model, train, params=space, curvature=curv, hvp_mode="double-backward",
                steps=args.steps, probes=args.probes, progress=not args.no_progress,
            )  # fmt: skip
            spec.info["checkpoint"] = ckpt.name
            spec.save(out / f"{ckpt.name}-{curv}.json")
            found[f"{ckpt.name} {curv}"] = spec
            print(f"{ckpt.name} {curv}: {spec.summary()}; {spec.seconds:.0f} s", flush=True)
        if args.solvers:
            rows = compare_solvers(model, space, train, dev, args.damping, args.max_iter,
                                   args.tol, not args.no_progress)  # fmt: skip
            (out / f"{ckpt.name}-solvers.json").write_text(json.dumps(rows, indent=1) + "\n")
            for r in rows:
                print(
                    f"{ckpt.name} {r['solver']}: {r['products']} products, {r['seconds']:.0f} s, "
                    f"residual of (H + {args.damping:g} I) {r['reference_relative_residual']:.2e}, "
                    f"top-1000 overlap with MINRES {r['top1000_overlap_minres']:.2f}, with "
                    f"Taylor {r['top1000_overlap_taylor']:.2f} ({r['reason']})",
                    flush=True,
                )
    spectra.plot_density(found, out / "spectra.png")


if __name__ == "__main__":
    main()
