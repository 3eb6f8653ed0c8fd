"""`mftx.score`: score every analysed parameter by what zeroing it would do.

Methods (the sign convention is in `mftx.scores.METHODS`):
- ``gradient``: |θ| − |θ − lr·g_train| (first order; > 0: moving toward zero, "detrimental").
- ``influence``: −θ ⊙ s with s = (C + λI)⁻¹ ∇L_val, C the training loss's
  curvature: one inverse-curvature-vector product scores every parameter (< 0:
  removing it is predicted to lower validation loss, "beneficial"). The default
  solver is EK-FAC (the Kronecker-factored Fisher, inverted in closed form: well
  posed, no curvature products), chosen by the project's methods benchmark (see
  `DEFAULT_SOLVER`). The reference formula as written, C = H the Hessian with
  λ = 0.01, is ``solver="minres"``; also CG, LiSSA, explicit, and a low-rank
  inverse from Lanczos eigenpairs; ``damping="auto"`` picks λ from the spectrum.
  An iterative solve that stops short of its tolerance warns
  (`mftx.ConvergenceWarning`) or, with ``strict=True``, raises.
- ``taylor``: −g_val ⊙ θ, first-order change of validation loss when zeroing.
- ``obd``: −g_val ⊙ θ + ½ diag(H_val) ⊙ θ², second order (Optimal Brain Damage),
  diag(H_val) by Hutchinson probes.
- ``magnitude``: |θ|.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops, sharded
from ._config import help_field
from .backends.backend import BACKENDS, get_backend
from .core import dist
from .core.objective import check_batches, default_loss
from .core.params import ParamSpace, select_params
from .curvature import spectra
from .curvature.hvp import (
    CURVATURES,
    MODES,
    Curvature,
    batch_weights,
    resolve_batch_size,
)
from .errors import ConvergenceError, ConvergenceWarning
from .inverse import ekfac, solvers
from .scores import METHODS, Scores, describe, meets_tolerance

__all__ = ["DEFAULT_SOLVER", "ScoreConfig", "score"]

log = logging.getLogger("mftx")

#: The default influence solver. Chosen by the methods benchmark (docs/results/methods and
#: methods-90) among the well-posed variants (a closed form, or a converged solve of a
#: positive-definite system): EK-FAC of the sampled Fisher had the best held-out gain and
#: group fidelity at the 60 % checkpoint, single-parameter fidelity within 0.02 of the best
#: at 90 %, no curvature products and the least time. ``solver="minres"`` is the reference
#: formula as written (Hessian, λ = 0.01), which on every real checkpoint stops short.
DEFAULT_SOLVER = "ekfac"


@dataclass
class ScoreConfig:
    """Every setting of a scoring run (recorded with the scores)."""

    method: str = help_field("gradient | influence | taylor | obd | magnitude", "influence")
    solver: str = help_field(
        "inverse-curvature solver: ekfac (default: Kronecker-factored Fisher in closed form, "
        "no products) | minres (the reference formula: H + λI, indefinite systems) | cg | "
        "lissa | explicit | lanczos (low-rank inverse from eigenpairs)",
        DEFAULT_SOLVER,
    )
    curvature: str = help_field(
        "hessian | ggn (generalised Gauss-Newton, PSD) for the product-based solvers; "
        "solver='ekfac' always uses the Fisher",
        "hessian",
    )
    damping: Union[float, str] = help_field(
        "λ added to the curvature: solves (H + λI) s = ∇L_val; 'auto': from the estimated "
        "spectrum, λ = μ + max(0.1 μ, 0.01 ρ), μ = max(0, −λ_min), ρ the spectral radius",
        0.01,
    )
    max_iter: int = help_field("CG / MINRES iteration cap", 100)
    tol: float = help_field(
        "CG / MINRES stop at relative residual <= tol; LiSSA at update <= tol", 1e-6
    )
    lr: float = help_field("learning rate of the gradient rule |θ − lr·g| < |θ|", 2e-5)
    backend: str = help_field("eager | compile (torch.compile) | xla (torch_xla)", "eager")
    hvp_mode: str = help_field("rev-rev | fwd-rev | double-backward", "rev-rev")
    cache_graphs: Union[bool, str] = help_field(
        "True (double-backward): keep each batch's first-order graph; 'auto': only when the "
        "graphs of all HVP batches fit cache_budget x the free memory",
        False,
    )
    cache_budget: float = help_field(
        "cache_graphs='auto': share of free memory graphs may take", 0.5
    )
    hvp_batches: Optional[int] = help_field(
        "use this many training batches (seeded) for HVPs; None: all", None
    )
    fixed_iterations: bool = help_field(
        "CG runs exactly max_iter iterations, no host sync inside", False
    )
    on_negative_curvature: str = help_field("raise | stop: what CG does on pᵀ(H+λI)p <= 0", "raise")
    lissa_scale: float = help_field("LiSSA scale (> largest eigenvalue of H + λI)", 10.0)
    lissa_depth: int = help_field("LiSSA recursion depth", 100)
    lissa_repeats: int = help_field("LiSSA repeats averaged", 1)
    lissa_stochastic: bool = help_field("LiSSA: one sampled batch per step instead of all", False)
    rank: int = help_field("solver='lanczos': eigenpairs of largest |λ| kept", 20)
    lanczos_steps: int = help_field(
        "Lanczos cap (curvature products) for damping='auto' and solver='lanczos'", 60
    )
    lanczos_tol: float = help_field(
        "Lanczos stops once the wanted Ritz values' error bounds are <= this × max|θ|", 1e-3
    )
    lowrank_file: Optional[str] = help_field(
        "solver='lanczos': load the eigenpairs from this safetensors file if it exists (no "
        "curvature products), else compute and save them there",
        None,
    )
    fisher: str = help_field(
        "solver='ekfac': sampled (labels from the model) | empirical", "sampled"
    )
    spectrum: Optional[Union[str, Path, spectra.Spectrum]] = help_field(  # noqa: RUF009
        "damping='auto': λ from this recorded spectrum (an mftx.Spectrum or its JSON file, of "
        "the same curvature, parameters and HVP batches) instead of a Lanczos run: no products",
        None,
    )
    probes: int = help_field(
        "OBD: Hutchinson probes for diag(H_val); 0: exact diagonal (small spaces)", 16
    )
    seed: int = help_field("seed for batch subsampling, LiSSA sampling and probes", 0)
    max_explicit: int = help_field(
        "largest parameter count the explicit solver accepts", solvers.MAX_EXPLICIT
    )
    xla_compile: bool = help_field(
        "backend='xla': also torch.compile(backend='openxla') the per-batch HVP", False
    )
    distributed: Optional[bool] = help_field(
        "data-parallel over torch.distributed ranks (None: when initialised): train and val "
        "are this rank's shards; gradients, HVPs, EK-FAC factors and counts are summed over "
        "ranks and seeded draws index the union (the shards in rank order), so every rank "
        "gets one process's result on the union (mftx.core.dist.shard splits a list)",
        None,
    )
    batch_size_fn: Optional[Callable[[Any], float]] = help_field(
        "batch -> its weight in the dataset mean (examples, tokens); None: the loss's own "
        "count (Objective.batch_size; the HF loss counts labelled entries)",
        None,
    )
    num_examples: Optional[Mapping[str, float]] = help_field(
        "{'train': N, 'val': M}: divide dataset sums by these counts instead of the summed "
        "batch sizes (e.g. losses summed over rows)",
        None,
    )
    progress: bool = help_field("show tqdm progress bars", True)
    strict: bool = help_field(
        "raise mftx.ConvergenceError instead of warning (mftx.ConvergenceWarning) when an "
        "iterative solve stops without meeting its tolerance",
        False,
    )

    def validate(self) -> None:
        def one_of(name, options):
            if getattr(self, name) not in options:
                raise ValueError(
                    f"{name} must be one of {tuple(options)}, got {getattr(self, name)!r}"
                )

        one_of("method", METHODS)
        one_of("solver", solvers.SOLVERS)
        one_of("curvature", CURVATURES)
        one_of("backend", BACKENDS)
        one_of("hvp_mode", MODES)
        one_of("on_negative_curvature", ("raise", "stop"))
        one_of("cache_graphs", (False, True, "auto"))
        if not 0 < self.cache_budget <= 1:
            raise ValueError(f"cache_budget must be in (0, 1], got {self.cache_budget!r}")
        one_of("fisher", ekfac.FISHERS)
        if self.method == "influence" and self.solver == "ekfac" and self.curvature != "hessian":
            raise ValueError(
                f"curvature={self.curvature!r} applies to the product-based solvers (cg, minres, "
                "lissa, explicit, lanczos); solver='ekfac' (the default) inverts the Kronecker-"
                f"factored Fisher. Pass solver='cg' (or 'minres') for the {self.curvature.upper()}."
            )
        if self.damping != "auto":
            if isinstance(self.damping, str):
                raise ValueError(f"damping must be a number >= 0 or 'auto', got {self.damping!r}")
            solvers._check_damping(self.damping)
        solvers.check_max_iter(self.max_iter)
        solvers.check_tol(self.tol)
        ops._checks.finite_nonnegative("lanczos_tol", self.lanczos_tol)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.lanczos_steps < 2 or (self.solver == "lanczos" and self.lanczos_steps < self.rank):
            raise ValueError(
                f"lanczos_steps must be >= 2 and >= rank ({self.rank}) for solver='lanczos', "
                f"got {self.lanczos_steps}"
            )
        if self.hvp_batches is not None and self.hvp_batches < 1:
            raise ValueError(f"hvp_batches must be >= 1 or None, got {self.hvp_batches}")
        if self.probes < 0:
            raise ValueError(f"probes must be >= 0 (0: exact diagonal), got {self.probes}")
        ops._checks.lr_value(self.lr)
        if self.batch_size_fn is not None and not callable(self.batch_size_fn):
            raise TypeError(f"batch_size_fn must be callable, got {self.batch_size_fn!r}")
        if self.num_examples is not None:
            keys = set(self.num_examples) if isinstance(self.num_examples, Mapping) else None
            if keys is None or not keys <= {"train", "val"}:
                raise ValueError(
                    "num_examples must be a dict with keys 'train' and/or 'val', "
                    f"got {self.num_examples!r}"
                )
            for k, v in self.num_examples.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                    raise ValueError(f"num_examples[{k!r}] must be a positive number, got {v!r}")
        get_backend(self.backend).check(self)

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name}: {f.metadata.get('help', '')}" for f in fields(cls))


def _materialise(
    data: Optional[Iterable], what: str, needed: bool, distributed: bool = False
) -> list:
    """The batches of `data` as a list, read once: a list, any iterable, a DataLoader.

    Mapping batches (a collator's BatchEncoding) become plain dicts. The solvers
    pass over the batches many times, so a shuffling DataLoader is read once and
    its order kept. Distributed, a rank's shard may be empty as long as the
    union is not (checked on every rank alike).
    """
    if data is None:
        if needed:
            raise ValueError(f"{what} is None but the method needs {what} batches")
        return []
    if isinstance(data, (Mapping, torch.Tensor)):
        raise TypeError(
            f"{what} is a single {type(data).__name__}; pass an iterable of batches "
            "(a list of dicts, a DataLoader)"
        )
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            f"{what} must be an iterable of batches (a list of dicts, a DataLoader), "
            f"got {type(data).__name__}"
        ) from None
    batches = [dict(b) if isinstance(b, Mapping) else b for b in it]
    if needed and distributed:
        if sum(dist.counts(len(batches))) == 0:
            raise ValueError(
                f"{what} is empty on every rank: the method needs at least one {what} batch"
            )
    elif needed and not batches:
        raise ValueError(f"{what} is empty: the method needs at least one {what} batch")
    return batches


def _needs(method: str):
    """(needs train, needs val)."""
    uses = METHODS[method]["uses"]
    return "train" in uses, "val" in uses


def score(
    model: nn.Module,
    train: Optional[Iterable] = None,
    val: Optional[Iterable] = None,
    method: str = "influence",
    params: Optional[ParamSpace] = None,
    loss_fn: Optional[Callable] = None,
    solver: str = DEFAULT_SOLVER,
    curvature: str = "hessian",
    damping: Union[float, str] = 0.01,
    max_iter: int = 100,
    tol: float = 1e-6,
    lr: float = 2e-5,
    backend: str = "eager",
    **options: Any,
) -> Scores:
    """Score every analysed parameter of `model` with `method`.

    `train` and `val` are iterables of batches (dicts of tensors; the default
    loss is the Hugging Face classification loss, so batches carry ``labels``):
    lists, generators or DataLoaders, read once; tensors go to the model's device.
    `params` defaults to `select_params(model)` (the attention and MLP blocks:
    no embeddings, normalisation layers, pooler or head). Further options are the fields of `ScoreConfig`
    (``hvp_mode``, ``hvp_batches``, ``fixed_iterations``, ``lissa_*``, ``probes``,
    ``seed``, ``progress``, ``strict`` ...). The model is scored in eval mode and left in
    the mode it was in. Returns `Scores` with the config and solver statistics
    (`Scores.summary()` says what was computed in one line); for ``influence``,
    ``stats["damping"]`` is the λ used (a float, also when ``damping="auto"``
    chose it) and ``stats["spectrum"]`` the spectrum estimate when one was made.
    `val` may also be a dict of several validation sets (name -> iterable of
    batches): then a dict of `Scores` by name, the CG / MINRES influence solves
    sharing one curvature product per iteration and EK-FAC fitting its factors once
    (each answer that of its own solve; other methods and solvers score the sets one
    after another).

    ``method="influence"`` defaults to ``solver="ekfac"`` (see `DEFAULT_SOLVER`);
    ``solver="minres"`` (with the default ``damping=0.01``) is the reference formula
    as written. An iterative solve (CG, MINRES, LiSSA, Lanczos) that stops without
    meeting its tolerance warns with `mftx.ConvergenceWarning` naming the solver,
    iterations and residual, or raises `mftx.ConvergenceError` with ``strict=True``.
    """
    unknown = set(options) - {f.name for f in fields(ScoreConfig)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; see mftx.ScoreConfig.help()")
    cfg = ScoreConfig(
        method=method, solver=solver, curvature=curvature, damping=damping, max_iter=max_iter,
        tol=tol, lr=lr, backend=backend, **options,
    )  # fmt: skip
    return score_with_config(model, train, val, cfg, params=params, loss_fn=loss_fn)


def score_with_config(
    model: nn.Module,
    train: Optional[Iterable],
    val: Optional[Iterable],
    cfg: ScoreConfig,
    params: Optional[ParamSpace] = None,
    loss_fn: Optional[Callable] = None,
) -> Scores:
    if _several(val):
        return _score_sets(model, train, val, cfg, params, loss_fn)
    cfg.validate()
    backend = get_backend(cfg.backend)
    on = dist.active(cfg.distributed)
    need_train, need_val = _needs(cfg.method)
    train_b = _materialise(train, "train", need_train, on)
    val_b = _materialise(val, "val", need_val, on)
    model, train_b, val_b, params, cfg = backend.prepare(model, train_b, val_b, params, cfg)
    space = params if params is not None else select_params(model)
    frozen = [n for n, p in space if not p.requires_grad]
    if frozen and cfg.method != "magnitude":
        raise ValueError(
            f"analysed parameter(s) without grad (requires_grad=False): {frozen[:5]}"
            f"{' ...' if len(frozen) > 5 else ''}; unfreeze them or exclude them from params"
        )
    loss_fn = loss_fn if loss_fn is not None else default_loss(model)
    check_batches(loss_fn, train_b, "train")
    check_batches(loss_fn, val_b, "val")
    size = resolve_batch_size(loss_fn, cfg.batch_size_fn)
    batch_weights(size, train_b, "train")  # bad weights fail here, before any work
    batch_weights(size, val_b, "val")
    if (cfg.method == "influence" and cfg.solver == "explicit") or (
        cfg.method == "obd" and cfg.probes == 0
    ):
        solvers.check_explicit_size(space.numel, cfg.max_explicit)
    if cfg.method == "influence" and cfg.solver == "ekfac":
        ekfac.linear_blocks(model, space)  # refuses parameters outside nn.Linear modules
    if sharded.is_sharded(space.params):  # FSDP2: each rank scores its shard
        s = sharded.score(model, train_b, val_b, space, loss_fn, cfg)
        s.config.update(asdict(cfg), loss_fn=_name(loss_fn), batch_size_fn=None
                        if cfg.batch_size_fn is None else _name(cfg.batch_size_fn))  # fmt: skip
        return s

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        tensors, stats, fused = _METHODS[cfg.method](model, space, train_b, val_b, loss_fn, cfg)
    except Exception as exc:
        clearer = backend.explain(exc)
        if clearer is None:
            raise
        raise clearer from exc
    finally:
        model.train(was_training)
    tensors = [t.detach().cpu() for t in tensors]
    stats["seconds"] = time.perf_counter() - t0
    stats["analysed"] = space.summary()
    config = asdict(cfg)
    if isinstance(cfg.spectrum, spectra.Spectrum):  # in stats["spectrum"]; the config names it
        config["spectrum"] = "recorded"
    config["n_train_batches"] = int(sum(dist.counts(len(train_b), on)))  # the union's
    config["n_val_batches"] = int(sum(dist.counts(len(val_b), on)))
    config["loss_fn"] = _name(loss_fn)
    config["batch_size_fn"] = None if cfg.batch_size_fn is None else _name(cfg.batch_size_fn)
    s = Scores(cfg.method, dict(zip(space.names, tensors)), config=config, stats=stats)
    s._fused_flagged = fused
    _check_converged(s, cfg)
    return s


_ADVICE = (
    "Try solver='ekfac' (closed form, no curvature products), damping='auto' (a λ that makes "
    "H + λI positive definite, where CG converges), curvature='ggn' with solver='cg', or a "
    "larger max_iter; mftx.diagnose(model, train) shows the spectrum. strict=True raises "
    "instead of warning."
)


def _check_converged(s: Scores, cfg: ScoreConfig) -> None:
    """Warn (or with strict, raise) when an iterative solve stopped short of its tolerance."""
    solver = s.stats.get("solver")
    if not solver or meets_tolerance(s.config, solver):
        return
    msg = f"mftx.score: the solve did not converge: {describe(s.method, s.config, s.stats)}. "
    msg += "The scores come from a partial iterate, not from the solution. " + _ADVICE
    if cfg.strict:
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def _curvature(
    model, space, batches, loss_fn, cfg: ScoreConfig, which: str, share: float = 1.0
) -> Curvature:
    """The Curvature over `batches` of the `which` set ('train' or 'val'); `share`: the
    part of that set's weight the batches hold (for num_examples of a subsample)."""
    n = (cfg.num_examples or {}).get(which)
    return get_backend(cfg.backend).curvature(
        model, space, batches, loss_fn, cfg, num_examples=n if n is None else n * share
    )


def _gradient(model, space, train, val, loss_fn, cfg):
    op = _curvature(model, space, train, loss_fn, cfg, "train")
    g, loss = op.gradient(_progress(train, cfg, "train gradient"), "training loss")
    grads = space.unflatten(g)
    theta = space.detached()
    out = []
    for p, gi in zip(theta, grads):
        pd = p.to(torch.float64)
        out.append((pd.abs() - (pd - gi.to(torch.float64) * cfg.lr).abs()).to(p.dtype))
    fused = ops.toward_zero([t.cpu() for t in theta], [g.cpu() for g in grads], cfg.lr)
    return out, {"train_loss": loss, "flagged": len(fused), "grad_norm": float(g.norm())}, fused


def _influence(model, space, train, val, loss_fn, cfg):
    val_op = _curvature(model, space, val, loss_fn, cfg, "val")
    g_val, val_loss = val_op.gradient(_progress(val, cfg, "val gradient"), "validation loss")
    on = dist.active(cfg.distributed)
    # Drawn by global batch index: the same batches whatever the world size.
    idx, n_drawn = dist.sample_local(len(train), cfg.hvp_batches, cfg.seed, on)
    share = 1.0
    if (cfg.num_examples or {}).get("train") is not None:
        w = batch_weights(resolve_batch_size(loss_fn, cfg.batch_size_fn), train)
        sums = torch.tensor([sum(w[i] for i in idx), sum(w)], dtype=torch.float64)
        sums = dist.all_sum(sums, on)
        if float(sums[1]) > 0:
            share = float(sums[0] / sums[1])
    batches = [train[i] for i in idx]
    stats = {
        "val_loss": val_loss,
        "val_grad_norm": float(g_val.norm()),
        "hvp_batches_used": n_drawn,
    }
    if cfg.solver == "ekfac":
        (res,) = _ekfac_solve(model, space, batches, loss_fn, [g_val], cfg, stats)
        stats.update({"n_hvp": 0, "n_batch_hvp": 0})
    else:
        op = _curvature(model, space, batches, loss_fn, cfg, "train", share)
        try:
            res = _solve(op, g_val, cfg, stats)
        finally:
            op.release()
        stats.update({"n_hvp": op.n_matvec, "n_batch_hvp": op.n_batch_products})
        if op.cache_decision is not None:
            stats["graph_cache"] = op.cache_decision
    s = space.unflatten(res.x)
    out = [-(si * p) for si, p in zip(s, space.detached())]
    stats["solver"] = res.stats()
    return out, stats, None


def _spectral_damping(op: Curvature, cfg: ScoreConfig, stats: dict) -> float:
    """The numeric damping, or for "auto" the rule applied to a Lanczos estimate."""
    if cfg.damping != "auto":
        return float(cfg.damping)
    if cfg.spectrum is not None:
        spec = _recorded_spectrum(cfg, op)
        stats["spectrum"] = spec.to_json()
        stats["spectrum_recorded"] = True
        log.info("damping='auto' from the recorded spectrum: %s", spec.summary())
        return spec.auto_damping()
    like = op.space.flatten(op.space.detached())
    spec = spectra.estimate(
        op.matvec, like, steps=cfg.lanczos_steps, tol=cfg.lanczos_tol, probes=1,
        seed=cfg.seed, progress=cfg.progress, info={"curvature": cfg.curvature},
    )  # fmt: skip
    stats["spectrum"] = spec.to_json()
    log.info("damping='auto': %s", spec.summary())
    return spec.auto_damping()


def _solve(op: Curvature, b: torch.Tensor, cfg: ScoreConfig, stats: dict) -> solvers.SolveResult:
    """(H + λI) s = b with the configured solver; records λ in stats["damping"]."""
    if cfg.solver == "lanczos":
        return _lowrank_solve(op, b, cfg, stats)
    damping = stats["damping"] = _spectral_damping(op, cfg, stats)
    if cfg.solver == "cg":
        return solvers.cg(
            op.matvec, b, damping, tol=cfg.tol, max_iter=cfg.max_iter,
            fixed_iterations=cfg.fixed_iterations, on_negative_curvature=cfg.on_negative_curvature,
            progress=cfg.progress, sync=op.sync,
        )  # fmt: skip
    if cfg.solver == "minres":
        return solvers.minres(
            op.matvec, b, damping, tol=cfg.tol, max_iter=cfg.max_iter,
            fixed_iterations=cfg.fixed_iterations, progress=cfg.progress, sync=op.sync,
        )  # fmt: skip
    if cfg.solver == "lissa":
        return solvers.lissa(
            op.matvec, b, damping, scale=cfg.lissa_scale, depth=cfg.lissa_depth,
            repeats=cfg.lissa_repeats, tol=cfg.tol,
            n_batches=op.global_batches()[1] if cfg.lissa_stochastic else None, seed=cfg.seed,
            progress=cfg.progress,
        )  # fmt: skip
    return solvers.explicit(op.matvec, b, damping, max_size=cfg.max_explicit)


def _lowrank_solve(op: Curvature, b: torch.Tensor, cfg: ScoreConfig, stats: dict):
    """solver="lanczos": eigenpairs from Lanczos (or `lowrank_file`), then V(Λ + λ)⁻¹Vᵀb."""
    from .inverse.lowrank import LowRankInverse

    t0 = time.perf_counter()
    space = op.space
    path = Path(cfg.lowrank_file) if cfg.lowrank_file else None
    setting = {"curvature": cfg.curvature, "hvp_batches": op.global_batches()[1], "seed": cfg.seed}
    exists = path is not None and path.is_file()
    if op.distributed and path is not None:  # load only if every rank sees the file
        exists = min(dist.counts(float(exists))) > 0
    if exists:
        inv = LowRankInverse.load(path)
        inv.check_space(space.names, space.numels)
        saved = {k: inv.info.get(k) for k in setting}
        if inv.rank != cfg.rank:
            raise ValueError(f"{path} holds {inv.rank} eigenpairs; rank={cfg.rank} was asked for")
        if saved != setting:
            raise ValueError(f"{path} holds eigenpairs computed with {saved}, not {setting}")
        loaded = True
    else:
        info = {"names": list(space.names), "numels": list(space.numels), **setting}
        inv = LowRankInverse.from_operator(
            op.matvec, b, cfg.rank, cfg.lanczos_steps, tol=cfg.lanczos_tol, seed=cfg.seed,
            progress=cfg.progress, info=info,
        )  # fmt: skip
        if path is not None and dist.rank_world(op.distributed)[0] == 0:
            inv.save(path)
        loaded = False
    lam = inv.eigenvalues
    if cfg.damping == "auto":
        worst = int(torch.argmin(lam))
        damping = spectra.auto_damping(float(lam.min()), float(lam.max()), float(inv.errors[worst]))
    else:
        damping = float(cfg.damping)
    stats["damping"] = damping
    x = inv.solve(b, damping)
    V = inv.eigenvectors.to(b.device, b.dtype)
    # For exact eigenpairs (H + λI)x = V Vᵀ b: the residual is the part of b outside their span.
    captured = float(torch.linalg.vector_norm(b - V.T @ (V @ b)) / torch.linalg.vector_norm(b))
    stats["lowrank"] = {
        "rank": inv.rank, "eigenvalues": lam.tolist(), "errors": inv.errors.tolist(),
        "loaded": loaded, "file": str(path) if path is not None else None,
        "lanczos_steps": inv.info.get("steps"), "lanczos_reason": inv.info.get("reason"),
    }  # fmt: skip
    return solvers.SolveResult(
        x, "lanczos", int(inv.info.get("steps") or 0), bool(inv.info.get("converged")),
        f"rank {inv.rank} of {'saved' if loaded else 'fresh'} eigenpairs "
        f"({inv.info.get('reason')})", [captured], 0 if loaded else int(inv.info["n_matvec"]),
        time.perf_counter() - t0,
    )  # fmt: skip


def _ekfac_solve(model, space, batches, loss_fn, gs: List[torch.Tensor], cfg: ScoreConfig,
                 stats: dict) -> List[solvers.SolveResult]:  # fmt: skip
    """solver="ekfac": fit the Kronecker factors on the HVP batches once, invert in closed form
    for each right-hand side of `gs` (the fit does not depend on them)."""
    t0 = time.perf_counter()
    fitted = ekfac.fit(
        model,
        space,
        batches,
        loss_fn,
        fisher=cfg.fisher,
        seed=cfg.seed,
        progress=cfg.progress,
        distributed=dist.active(cfg.distributed),
    )
    lam = fitted.eigenvalues()
    if cfg.damping == "auto":
        damping = spectra.auto_damping(float(lam.min()), float(lam.max()))
    else:
        damping = float(cfg.damping)
    stats["damping"] = damping
    t1 = time.perf_counter()
    xs = [fitted.solve(g, damping) for g in gs]
    stats["ekfac"] = {
        **fitted.info, "solve_seconds": (time.perf_counter() - t1) / len(gs),
        "eigenvalue_max": float(lam.max()), "eigenvalue_mean": float(lam.mean()),
    }  # fmt: skip
    what = f"EK-FAC of the {cfg.fisher} Fisher over {len(fitted.blocks)} linear modules"
    seconds = time.perf_counter() - t0
    return [solvers.SolveResult(x, "ekfac", 0, True, what, [], 0, seconds) for x in xs]


def _taylor(model, space, train, val, loss_fn, cfg):
    op = _curvature(model, space, val, loss_fn, cfg, "val")
    g_val, val_loss = op.gradient(_progress(val, cfg, "val gradient"), "validation loss")
    out = [-(g * p) for g, p in zip(space.unflatten(g_val), space.detached())]
    return out, {"val_loss": val_loss, "val_grad_norm": float(g_val.norm())}, None


def _obd(model, space, train, val, loss_fn, cfg):
    op = _curvature(model, space, val, loss_fn, cfg, "val")
    g_val, val_loss = op.gradient(_progress(val, cfg, "val gradient"), "validation loss")
    if cfg.probes == 0:
        diag = exact_diagonal(op, cfg.progress)
    else:
        diag = hutchinson_diagonal(op, cfg.probes, cfg.seed, cfg.progress)
    theta = space.flatten(space.detached())
    s = -g_val * theta + 0.5 * diag * theta * theta
    stats = {"val_loss": val_loss, "probes": cfg.probes, "n_hvp": op.n_matvec}
    return space.unflatten(s), stats, None


def _magnitude(model, space, train, val, loss_fn, cfg):
    return [p.abs() for p in space.detached()], {}, None


_METHODS = {
    "gradient": _gradient,
    "influence": _influence,
    "taylor": _taylor,
    "obd": _obd,
    "magnitude": _magnitude,
}


def hutchinson_diagonal(
    op: Curvature, probes: int, seed: int, progress: bool = False
) -> torch.Tensor:
    """diag(A) ≈ mean over Rademacher probes z of z ⊙ (A z)."""
    gen = torch.Generator().manual_seed(seed)
    n = op.space.numel
    acc = torch.zeros(n, dtype=op.space.dtype, device=op.space.device)
    for _ in tqdm(range(probes), desc="hutchinson", disable=not progress, leave=False):
        z = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(acc)
        acc += z * op.matvec(z)
    return acc / probes


def exact_diagonal(op: Curvature, progress: bool = False) -> torch.Tensor:
    """diag(A) exactly, one product per parameter (small spaces only)."""
    n = op.space.numel
    out = torch.empty(n, dtype=op.space.dtype, device=op.space.device)
    e = torch.zeros_like(out)
    for j in tqdm(range(n), desc="diagonal", disable=not progress, leave=False):
        e[j] = 1
        out[j] = op.matvec(e)[j]
        e[j] = 0
    return out


def _progress(batches, cfg: ScoreConfig, desc: str):
    return tqdm(batches, desc=desc, disable=not cfg.progress, leave=False)


# ---------------------------------------------------------------- several validation sets


def _several(val: Any) -> bool:
    """Whether `val` is a dict of validation sets (name -> batches), not one batch."""
    return (
        isinstance(val, Mapping)
        and len(val) > 0
        and all(
            not isinstance(v, (torch.Tensor, Mapping, str, bytes)) and hasattr(v, "__iter__")
            for v in val.values()
        )
    )


def _recorded_spectrum(cfg: ScoreConfig, op: Curvature) -> spectra.Spectrum:
    """`cfg.spectrum` loaded and checked against the system it is to damp."""
    spec = cfg.spectrum
    if not isinstance(spec, spectra.Spectrum):
        spec = spectra.Spectrum.load(spec)
    n = op.space.numel
    if spec.n != n:
        raise ValueError(f"the recorded spectrum is of {spec.n:,} parameters, the system {n:,}")
    info = spec.info or {}
    got = info.get("curvature")
    if got is not None and got != cfg.curvature:
        raise ValueError(
            f"the recorded spectrum is of the {got}, the system of the {cfg.curvature}"
        )
    used, here = info.get("hvp_batches"), int(sum(dist.counts(len(op.batches), op.distributed)))
    if used is not None and used != here:
        raise ValueError(f"the recorded spectrum used {used} training batches, this solve {here}")
    return spec


def _shared_solve(model, space, train_b, idx, share, loss_fn, grads, cfg: ScoreConfig, names,
                  common: dict) -> list:  # fmt: skip
    """CG / MINRES with one right-hand side per validation set: one stacked product per
    iteration on the training batches `idx`; fills `common` with what every set shares."""
    op = _curvature(model, space, [train_b[i] for i in idx], loss_fn, cfg, "train", share)
    try:
        damping = common["damping"] = _spectral_damping(op, cfg, common)
        solve = solvers.cg if cfg.solver == "cg" else solvers.minres
        kw = {"on_negative_curvature": cfg.on_negative_curvature} if cfg.solver == "cg" else {}
        results = solve(
            op.matvec, torch.stack(grads), damping, tol=cfg.tol, max_iter=cfg.max_iter,
            progress=cfg.progress, **kw,
        )  # fmt: skip
    finally:
        op.release()
    common.update({"hvp_batches_used": len(idx), "n_hvp": op.n_matvec,
                   "n_batch_hvp": op.n_batch_products, "shared_solve": names})  # fmt: skip
    if op.cache_decision is not None:
        common["graph_cache"] = op.cache_decision
    return results


def _score_sets(model, train, val: Mapping, cfg: ScoreConfig, params, loss_fn) -> dict:
    """`score` with several validation sets: {name: Scores}."""
    cfg.validate()
    names = list(val)
    train_b = _materialise(train, "train", _needs(cfg.method)[0])
    sets = [_materialise(val[k], f"val[{k!r}]", True) for k in names]
    shared = (
        cfg.method == "influence"
        and cfg.solver in ("cg", "minres", "ekfac")
        and not (cfg.fixed_iterations and cfg.solver != "ekfac")
        and cfg.backend in ("eager", "compile")
        and len(names) > 1
        and not dist.active(cfg.distributed)
    )
    if not shared:  # one after another (data-parallel runs too: each set as score() does)
        return {
            k: score_with_config(model, train_b, v, cfg, params=params, loss_fn=loss_fn)
            for k, v in zip(names, sets)
        }
    backend = get_backend(cfg.backend)
    flat = [b for v in sets for b in v]
    model, train_b, flat, params, cfg = backend.prepare(model, train_b, flat, params, cfg)
    bounds = [0]
    for v in sets:
        bounds.append(bounds[-1] + len(v))
    sets = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
    space = params if params is not None else select_params(model)
    frozen = [n for n, p in space if not p.requires_grad]
    if frozen:
        raise ValueError(f"analysed parameter(s) without grad (requires_grad=False): {frozen[:5]}")
    loss_fn = loss_fn if loss_fn is not None else default_loss(model)
    check_batches(loss_fn, train_b, "train")
    size = resolve_batch_size(loss_fn, cfg.batch_size_fn)
    batch_weights(size, train_b, "train")
    for k, v in zip(names, sets):
        check_batches(loss_fn, v, f"val[{k!r}]")
        batch_weights(size, v, f"val[{k!r}]")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        grads, common = [], {}
        per_set = []
        for k, v in zip(names, sets):
            val_op = _curvature(model, space, v, loss_fn, cfg, "val")
            g, loss = val_op.gradient(_progress(v, cfg, f"val gradient {k}"), "validation loss")
            grads.append(g)
            per_set.append({"val_loss": loss, "val_grad_norm": float(g.norm())})
        idx = dist.sample_indices(len(train_b), cfg.hvp_batches, cfg.seed)
        share = 1.0
        if len(idx) < len(train_b) and (cfg.num_examples or {}).get("train") is not None:
            w = batch_weights(size, train_b)
            share = sum(w[i] for i in idx) / sum(w)
        if cfg.solver == "ekfac":  # one fit, a closed-form inverse per set
            batches = [train_b[i] for i in idx]
            results = _ekfac_solve(model, space, batches, loss_fn, grads, cfg, common)
            common.update({"hvp_batches_used": len(idx), "n_hvp": 0, "n_batch_hvp": 0,
                           "shared_solve": names})  # fmt: skip
        else:
            results = _shared_solve(model, space, train_b, idx, share, loss_fn, grads, cfg,
                                    names, common)  # fmt: skip
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    out = {}
    theta = space.detached()
    for k, v, res, own in zip(names, sets, results, per_set):
        tensors = [(-(si * p)).detach().cpu() for si, p in zip(space.unflatten(res.x), theta)]
        stats = {**own, **common, "solver": res.stats(), "seconds": seconds,
                 "analysed": space.summary()}  # fmt: skip
        config = asdict(cfg)
        if isinstance(cfg.spectrum, spectra.Spectrum):
            config["spectrum"] = "recorded"
        config.update({"n_train_batches": len(train_b), "n_val_batches": len(v),
                       "loss_fn": _name(loss_fn),
                       "batch_size_fn": None if cfg.batch_size_fn is None else _name(cfg.batch_size_fn)})  # fmt: skip
        out[k] = Scores(cfg.method, dict(zip(space.names, tensors)), config=config, stats=stats)
        _check_converged(out[k], cfg)
    return out
