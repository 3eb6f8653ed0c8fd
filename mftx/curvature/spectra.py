"""`mftx.spectrum`: extreme eigenvalues, trace and spectral density of the curvature.

One Lanczos run (`mftx.curvature.lanczos`, full reorthogonalisation, float64 recurrence,
seeded Rademacher start) gives λ_min and λ_max as its extreme Ritz values, with
error bounds. The spectral density is estimated by stochastic Lanczos
quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017): a run from a random unit
vector q gives nodes θ_j (Ritz values) and weights τ_j = (first component of
the j-th eigenvector of T)², and Σ_j τ_j f(θ_j) estimates qᵀ f(A) q =
(1/n) tr f(A) in expectation; averaged over `probes` runs (the first is the run
above; the others keep no basis: quadrature needs only T). The trace is estimated from the same probes (Hutchinson: with a
Rademacher start z, n·α_1 = zᵀAz, no extra products) or, with
``trace="hutch++"``, by Hutch++ (Meyer et al. 2021) with its own products.

`auto_damping` turns a spectrum into the damping of ``damping="auto"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import fileio
from ..fileio import Reader
from .lanczos import extremes, lanczos, rademacher

__all__ = ["Spectrum", "auto_damping", "estimate", "hutchpp", "plot_density", "spectrum"]

_FORMAT = "mftx.spectrum/1"

#: The auto-damping rule's constants (see `auto_damping`).
AUTO_MARGIN = 0.1
AUTO_FLOOR = 0.01

MatVec = Callable[[torch.Tensor], torch.Tensor]


def auto_damping(
    lambda_min: float,
    lambda_max: float,
    lambda_min_error: float = 0.0,
    margin: float = AUTO_MARGIN,
    floor: float = AUTO_FLOOR,
) -> float:
    """λ = μ + max(margin·μ, floor·ρ), μ = max(0, −(λ_min − err)), ρ = max(|λ_min|, |λ_max|).

    μ shifts the most negative eigenvalue (taken at the low end of its Lanczos
    error bound) to zero; the extra term leaves H + λI with smallest eigenvalue
    at least margin·μ (a safety margin relative to the negative part) and at
    least floor·ρ (a floor relative to the spectral radius, so a positive
    semi-definite curvature still gets condition number <= about 1/floor).
    """
    for name, v in (("lambda_min", lambda_min), ("lambda_max", lambda_max)):
        if not math.isfinite(v):
            raise ValueError(f"auto damping needs a finite {name}, got {v}")
    if lambda_min > lambda_max:
        raise ValueError(f"lambda_min {lambda_min} > lambda_max {lambda_max}")
    mu = max(0.0, -(lambda_min - abs(lambda_min_error)))
    rho = max(abs(lambda_min), abs(lambda_max))
    if rho == 0.0:
        raise ValueError("the curvature is zero: no damping makes it an invertible system")
    return mu + max(margin * mu, floor * rho)


@dataclass
class Spectrum:
    """Estimated spectrum of a curvature matrix (n × n); JSON-serialisable."""

    n: int
    lambda_min: float
    lambda_max: float
    #: Lanczos error bounds: an eigenvalue lies within them of λ_min / λ_max.
    lambda_min_error: float
    lambda_max_error: float
    ritz_values: List[float]
    ritz_errors: List[float]
    trace: float
    #: Standard error of the trace estimate (None with a single probe).
    trace_std: Optional[float]
    trace_method: str
    #: Stochastic Lanczos quadrature: nodes and weights, one list per probe.
    nodes: List[List[float]]
    weights: List[List[float]]
    n_matvec: int
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)

    def auto_damping(self, margin: float = AUTO_MARGIN, floor: float = AUTO_FLOOR) -> float:
        """The damping of ``damping="auto"`` for this spectrum (see `auto_damping`)."""
        return auto_damping(
            self.lambda_min, self.lambda_max, self.lambda_min_error, margin=margin, floor=floor
        )

    def density(
        self, grid: Optional[torch.Tensor] = None, sigma: Optional[float] = None, points: int = 512
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(grid, density): the quadrature smoothed by a Gaussian of width `sigma`.

        Integrates to 1 over the real line (multiply by n for eigenvalue counts).
        Default sigma: 1 % of λ_max − λ_min; default grid: `points` values spanning
        the extremes plus 5 sigma.
        """
        width = self.lambda_max - self.lambda_min
        if sigma is None:
            sigma = 0.01 * width if width > 0 else max(abs(self.lambda_max), 1.0) * 1e-3
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if grid is None:
            grid = torch.linspace(
                self.lambda_min - 5 * sigma, self.lambda_max + 5 * sigma, points,
                dtype=torch.float64,
            )  # fmt: skip
        grid = torch.as_tensor(grid, dtype=torch.float64)
        out = torch.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights):
            th = torch.tensor(nodes, dtype=torch.float64)
            w = torch.tensor(weights, dtype=torch.float64)
            z = (grid[:, None] - th[None, :]) / sigma
            out += (w[None, :] * torch.exp(-0.5 * z * z)).sum(1)
        return grid, out / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def to_json(self) -> Dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Union[Mapping[str, Any], Reader]) -> Spectrum:
        if isinstance(data, Reader):  # the result of an analyze stage record
            data = data.obj
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"not an mftx spectrum (format {data.get('format')!r}, want {_FORMAT})"
            )
        body = {k: v for k, v in data.items() if k != "format"}
        return cls(**body)

    def save(self, path: Union[str, Path]) -> Path:
        return fileio.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> Spectrum:
        return cls.from_json(fileio.read_json(path))

    def summary(self) -> str:
        std = f" ± {self.trace_std:.3g}" if self.trace_std is not None else ""
        return (
            f"λ_min {self.lambda_min:.4g} (± {self.lambda_min_error:.1e}), λ_max "
            f"{self.lambda_max:.4g} (± {self.lambda_max_error:.1e}), trace {self.trace:.4g}{std} "
            f"[{self.trace_method}], n = {self.n:,}, {self.n_matvec} products"
        )


def hutchpp(matvec: MatVec, like: torch.Tensor, products: int, seed: int) -> float:
    """Hutch++ trace estimate with `products` products (a multiple of 3).

    With k = products/3: Q spans A S for k Rademacher vectors S, the trace of
    QᵀAQ is exact on that subspace, and Hutchinson with k more vectors estimates
    the rest (I − QQᵀ)A(I − QQᵀ). Exact when A has rank <= k.
    """
    if products < 3 or products % 3:
        raise ValueError(f"Hutch++ needs a positive multiple of 3 products, got {products}")
    k = products // 3
    n = like.numel()
    S = [rademacher(n, seed + i, like) for i in range(k)]
    Q, _ = torch.linalg.qr(torch.stack([matvec(s) for s in S], dim=1))
    del S
    low = sum(float(torch.dot(Q[:, i], matvec(Q[:, i].contiguous()))) for i in range(Q.shape[1]))
    rest = 0.0
    for i in range(k):
        g = rademacher(n, seed + k + i, like)
        g = g - Q @ (Q.T @ g)
        rest += float(torch.dot(g, matvec(g)))
    return low + rest / k


def estimate(
    matvec: MatVec,
    like: torch.Tensor,
    steps: int = 80,
    tol: float = 1e-3,
    probes: int = 3,
    probe_steps: int = 30,
    trace: str = "slq",
    trace_products: int = 30,
    seed: int = 0,
    progress: bool = False,
    info: Optional[Dict[str, Any]] = None,
) -> Spectrum:
    """The `Spectrum` of the symmetric operator `matvec` on vectors like `like`.

    The first Lanczos run (up to `steps` products) stops once λ_min and λ_max
    have converged to `tol` relative to the spectral radius; `probes` − 1 further
    runs of `probe_steps` steps, each from its own seeded Rademacher vector, add
    quadrature nodes for the density. ``trace="slq"`` estimates the trace from
    the probes' start vectors (Hutchinson, free); ``"hutch++"`` spends
    `trace_products` more products on Hutch++.
    """
    if probes < 1 or steps < 2 or (probes > 1 and probe_steps < 2):
        raise ValueError("spectrum needs probes >= 1 and at least 2 Lanczos steps per probe")
    if trace not in ("slq", "hutch++"):
        raise ValueError(f"trace must be 'slq' or 'hutch++', got {trace!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    t0 = time.perf_counter()
    n = like.numel()
    runs = []
    n_mv = 0
    for p in range(probes):
        run = lanczos(
            matvec, rademacher(n, seed + p, like), steps if p == 0 else probe_steps,
            tol=tol if p == 0 else 0.0, wanted=extremes, progress=progress,
            desc=f"lanczos probe {p + 1}/{probes}", reorthogonalize=p == 0,
        )  # fmt: skip
        run.chunks = []  # the basis is not needed any more
        runs.append(run)
        n_mv += run.n_matvec
    theta, _, bounds = runs[0].ritz()
    nodes, weights = [], []
    for run in runs:
        th, S, _ = run.ritz()
        nodes.append(th.tolist())
        weights.append((S[0] ** 2).tolist())
    # zᵀAz = n α_1 for the Rademacher start z (‖z‖² = n).
    samples = [n * float(run.alpha[0]) for run in runs]
    if trace == "slq":
        tr = sum(samples) / len(samples)
        std = (
            math.sqrt(sum((s - tr) ** 2 for s in samples) / (len(samples) - 1) / len(samples))
            if len(samples) > 1
            else None
        )
        method = f"Hutchinson over {len(samples)} Rademacher probe(s)"
    else:
        tr, std = hutchpp(matvec, like, trace_products, seed + probes), None
        n_mv += trace_products
        method = f"Hutch++ with {trace_products} products"
    info = dict(info or {})
    info.update(
        {"steps": steps, "tol": tol, "probes": probes, "probe_steps": probe_steps, "seed": seed,
         "first_run": runs[0].reason}
    )  # fmt: skip
    return Spectrum(
        n=n, lambda_min=float(theta[0]), lambda_max=float(theta[-1]),
        lambda_min_error=float(bounds[0]), lambda_max_error=float(bounds[-1]),
        ritz_values=theta.tolist(), ritz_errors=bounds.tolist(), trace=tr, trace_std=std,
        trace_method=method, nodes=nodes, weights=weights, n_matvec=n_mv,
        seconds=time.perf_counter() - t0, info=info,
    )  # fmt: skip


def spectrum(
    model: nn.Module,
    train: Iterable,
    *,
    params=None,
    curvature: str = "hessian",
    loss_fn: Optional[Callable] = None,
    hvp_mode: str = "rev-rev",
    backend: str = "eager",
    hvp_batches: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    distributed: Optional[bool] = None,
    cache_graphs: Union[bool, str] = "auto",
    **lanczos: Any,
) -> Spectrum:
    """Estimate the spectrum of the training loss's curvature over the analysed parameters.

    `train` is an iterable of batches (as for `mftx.score`); `hvp_batches`
    draws that many of them with `seed` (None: all). `params` defaults to
    `select_params(model)`, `loss_fn` to the model's classification loss;
    `curvature` is "hessian" or "ggn"; `hvp_mode`/`backend` as in `mftx.score`
    (eager or "compile"); `cache_graphs` as in `mftx.Curvature` (True needs
    ``hvp_mode="double-backward"``; "auto", the default on the eager backend, keeps
    each batch's first-order graph when the graphs of all batches fit in half the
    free memory: a product then costs one backward pass through it, not a forward
    and two backward passes).
    The model is evaluated in eval mode and left in its mode. Further keywords are `estimate`'s Lanczos settings (``steps``,
    ``tol``, ``probes``, ``probe_steps``, ``trace``, ``trace_products``); see
    `Spectrum` for the result. `distributed` (None: when torch.distributed is
    initialised): `train` is this rank's shard, products are summed over ranks
    and `hvp_batches` draws from the union of the shards (`mftx.core.dist`).
    """
    from ..core import dist
    from ..core.objective import check_batches, default_loss
    from ..core.params import select_params
    from .hvp import Curvature

    if backend not in ("eager", "compile"):
        raise ValueError(f"spectrum runs on backend 'eager' or 'compile', got {backend!r}")
    on = dist.active(distributed)
    batches = list(train)
    if sum(dist.counts(len(batches), on)) == 0:
        raise ValueError("train is empty: the spectrum needs at least one batch")
    idx, n_drawn = dist.sample_local(len(batches), hvp_batches, seed, on)
    _, total = dist.global_range(len(batches), on)
    batches = [batches[i] for i in idx]
    space = params if params is not None else select_params(model)
    loss_fn = loss_fn if loss_fn is not None else default_loss(model)
    check_batches(loss_fn, batches, "train")
    was_training = model.training
    model.eval()
    op = None
    try:
        op = Curvature(model, space, batches, loss_fn, curvature=curvature, mode=hvp_mode,
                       backend=backend, distributed=on,
                       cache_graphs=False if backend != "eager" and cache_graphs == "auto" else cache_graphs)  # fmt: skip
        like = space.flatten(space.detached())
        return estimate(
            op.matvec, like, seed=seed, progress=progress, **lanczos,
            info={"curvature": curvature, "hvp_batches": n_drawn, "hvp_mode": hvp_mode,
                  "dtype": str(like.dtype).replace("torch.", ""),
                  "batch_indices": list(dist.sample_indices(total, hvp_batches, seed))},
        )  # fmt: skip
    finally:
        if op is not None:
            op.release()
        model.train(was_training)


def plot_density(
    spectra: Mapping[str, Spectrum], path: Union[str, Path], sigma: Optional[float] = None
) -> Path:
    """One PNG with the smoothed density of each named spectrum (log scale; matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, spec in spectra.items():
        grid, dens = spec.density(sigma=sigma)
        ax.semilogy(grid.numpy(), dens.clamp(min=1e-12).numpy(), label=name)
        ax.axvline(spec.lambda_min, color=ax.lines[-1].get_color(), ls=":", lw=0.8)
        ax.axvline(spec.lambda_max, color=ax.lines[-1].get_color(), ls=":", lw=0.8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
