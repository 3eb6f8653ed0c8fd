"""Gradients and curvature-vector products of a loss over a dataset.

Everything is taken with respect to the analysed parameters only (a `ParamSpace`);
the model's other parameters and buffers stay fixed. A dataset's gradient or
product is the batch-size-weighted mean over its batches, so it equals the
gradient or product of the mean loss over all samples. What a batch counts
(rows, tokens) is `Objective.batch_size` or an explicit ``batch_size_fn``;
``num_examples`` divides by a given count instead of the sum of those weights.

Curvatures:
- ``"hessian"``: H v, the Hessian of the loss.
- ``"ggn"``: Jᵀ H_out J v, the generalised Gauss-Newton matrix (J: Jacobian of
  the model outputs, H_out: Hessian of the loss in the outputs). Positive
  semi-definite for convex losses such as cross-entropy.

Modes (how second derivatives are taken):
- ``"rev-rev"``: reverse-over-reverse, ``torch.func.vjp`` of ``torch.func.grad``.
  Valid on every backend; the default.
- ``"fwd-rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``.
- ``"double-backward"``: ``torch.autograd.grad`` with ``create_graph=True``.
  With ``cache_graphs=True`` the first-order graph of every batch is kept, so a
  product costs one backward pass through it instead of forward + two backward
  passes (memory: one graph per batch). ``cache_graphs="auto"`` (any mode, eager
  backend) measures the first batch's graph and keeps graphs only when those of
  all batches fit ``cache_budget`` × the free memory (`mftx.curvature.memory`); otherwise
  products run uncached in the given mode.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from ..core import dist
from ..core.dist import sample_indices
from ..core.objective import Objective, batch_size
from ..core.params import ParamSpace
from ..errors import NonFiniteError
from ..ops.indexing import FlatIndex
from . import memory

__all__ = [
    "CURVATURES",
    "MODES",
    "Curvature",
    "batch_weights",
    "resolve_batch_size",
    "sample_indices",
]

log = logging.getLogger("mftx")

MODES = ("rev-rev", "fwd-rev", "double-backward")
CURVATURES = ("hessian", "ggn")

Params = Tuple[torch.Tensor, ...]


class _Bound(nn.Module):
    """`fn(model, batch)` as a module, so `functional_call` can swap its parameters."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.model, batch)


class _Functional:
    """The loss (and outputs) as pure functions of the analysed parameters."""

    def __init__(self, model: nn.Module, space: ParamSpace, loss_fn: Callable):
        self.names = space.names
        self.loss_fn = loss_fn
        analysed = set(space.names)
        # The other parameters enter detached: no autograd bookkeeping for them.
        self._fixed = {
            "model." + n: p.detach() for n, p in model.named_parameters() if n not in analysed
        }
        self._loss_mod = _Bound(model, loss_fn)
        self._out_mod = _Bound(model, loss_fn.outputs) if isinstance(loss_fn, Objective) else None

    def _state(self, params: Params) -> Dict[str, torch.Tensor]:
        state = dict(self._fixed)
        state.update({"model." + n: p for n, p in zip(self.names, params)})
        return state

    def loss(self, params: Params, batch) -> torch.Tensor:
        return functional_call(self._loss_mod, self._state(params), (batch,))

    def outputs(self, params: Params, batch) -> torch.Tensor:
        return functional_call(self._out_mod, self._state(params), (batch,))

    def loss_on_outputs(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        return self.loss_fn.loss(outputs, batch)


def _hessian_product(fn: _Functional, mode: str) -> Callable:
    """(params, v, batch) -> H v for one batch."""
    if mode == "rev-rev":

        def hvp(params, v, batch):
            _, vjp_fn = vjp(lambda p: grad(fn.loss)(p, batch), params)
            return vjp_fn(v)[0]

    elif mode == "fwd-rev":

        def hvp(params, v, batch):
            return jvp(lambda p: grad(fn.loss)(p, batch), (params,), (v,))[1]

    else:

        def hvp(params, v, batch):
            with torch.enable_grad():
                leaves = tuple(p.detach().requires_grad_() for p in params)
                g = torch.autograd.grad(fn.loss(leaves, batch), leaves, create_graph=True)
                return torch.autograd.grad(g, leaves, grad_outputs=v)

    return hvp


def _ggn_product(fn: _Functional, mode: str) -> Callable:
    """(params, v, batch) -> Jᵀ H_out J v for one batch."""

    def out_hessian(z, u, batch):  # H_out u, small: the outputs' dimension
        loss_z = lambda zz: fn.loss_on_outputs(zz, batch)  # noqa: E731
        if mode == "fwd-rev":
            return jvp(grad(loss_z), (z,), (u,))[1]
        if mode == "rev-rev":
            return vjp(grad(loss_z), z)[1](u)[0]
        with torch.enable_grad():
            zl = z.detach().requires_grad_()
            (gz,) = torch.autograd.grad(loss_z(zl), zl, create_graph=True)
            return torch.autograd.grad(gz, zl, grad_outputs=u)[0]

    if mode == "fwd-rev":

        def ggn(params, v, batch):
            out = lambda p: fn.outputs(p, batch)  # noqa: E731
            z, jv = jvp(out, (params,), (v,))
            _, vjp_fn = vjp(out, params)
            return vjp_fn(out_hessian(z.detach(), jv, batch))[0]

    elif mode == "rev-rev":

        def ggn(params, v, batch):
            z, vjp_fn = vjp(lambda p: fn.outputs(p, batch), params)
            # Jv as the vjp of the linear map u -> Jᵀu.
            _, lin_vjp = vjp(vjp_fn, torch.zeros_like(z))
            (jv,) = lin_vjp((v,))
            return vjp_fn(out_hessian(z.detach(), jv, batch))[0]

    else:

        def ggn(params, v, batch):
            with torch.enable_grad():
                leaves = tuple(p.detach().requires_grad_() for p in params)
                z = fn.outputs(leaves, batch)
                u = torch.zeros_like(z, requires_grad=True)
                jtu = torch.autograd.grad(z, leaves, grad_outputs=u, create_graph=True)
                (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v)
                hjv = out_hessian(z.detach(), jv, batch)
                return torch.autograd.grad(z, leaves, grad_outputs=hjv)

    return ggn


def resolve_batch_size(
    loss_fn: Any, batch_size_fn: Optional[Callable[[Any], float]] = None
) -> Callable[[Any], float]:
    """A batch's weight in a dataset mean: `batch_size_fn`, else the loss's own
    ``batch_size`` (`Objective.batch_size`), else the number of rows."""
    if batch_size_fn is not None:
        return batch_size_fn
    own = getattr(loss_fn, "batch_size", None)
    return own if callable(own) else batch_size


def batch_weights(
    size: Callable[[Any], float], batches: Sequence[Any], what: str = ""
) -> List[float]:
    """`size` of every batch, checked: a finite number >= 0 (errors name `what` batch i)."""
    out = []
    for i, b in enumerate(batches):
        w = size(b)
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < math.inf):
            raise ValueError(
                f"the batch size of {what + ' ' if what else ''}batch {i} is {w!r}: batch_size_fn "
                "must return a "
                "finite number >= 0 (the batch's weight in the dataset mean)"
            )
        out.append(float(w))
    return out


class Curvature:
    """Gradients and curvature products of `loss_fn` over `batches`, on flat vectors.

    `matvec(v)` returns the batch-size-weighted mean of the per-batch products
    (or over the batches named by `indices`). `gradient(batches)` returns the
    weighted mean gradient and mean loss of any list of batches. Weights come
    from `batch_size_fn` (default: `resolve_batch_size`); with `num_examples`
    every mean is rescaled to a sum over the batches divided by it (a subset of
    the batches counts its share of `num_examples`, in proportion to weight).
    """

    def __init__(
        self,
        model: nn.Module,
        space: ParamSpace,
        batches: Sequence[Any],
        loss_fn: Callable,
        curvature: str = "hessian",
        mode: str = "rev-rev",
        backend: str = "eager",
        cache_graphs: bool = False,
        check_finite: bool = True,
        distributed: Optional[bool] = None,
        batch_size_fn: Optional[Callable[[Any], float]] = None,
        num_examples: Optional[float] = None,
        cache_budget: float = 0.5,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if curvature == "ggn" and not isinstance(loss_fn, Objective):
            raise TypeError(
                "curvature='ggn' needs the loss split into outputs and a loss on them: pass "
                "loss_fn=mftx.Objective(outputs, loss) (the default HF objective has it)"
            )
        if cache_graphs not in (False, True, "auto"):
            raise ValueError(f"cache_graphs must be True, False or 'auto', got {cache_graphs!r}")
        if cache_graphs is True and mode != "double-backward":
            raise ValueError("cache_graphs=True needs mode='double-backward'")
        if cache_graphs == "auto" and backend != "eager":
            raise ValueError("cache_graphs='auto' needs backend='eager' (graphs are kept eagerly)")
        if not 0 < cache_budget <= 1:
            raise ValueError(f"cache_budget must be in (0, 1], got {cache_budget!r}")
        if backend == "compile" and mode == "double-backward":
            raise ValueError(
                "backend='compile' traces torch.func transforms; use mode 'rev-rev' or 'fwd-rev' "
                "(torch.autograd.grad inside torch.compile breaks the graph)"
            )
        self.space = space
        self.batches = list(batches)
        self._size = resolve_batch_size(loss_fn, batch_size_fn)
        self.weights = batch_weights(self._size, self.batches)
        if num_examples is not None and not (0 < num_examples < math.inf):
            raise ValueError(f"num_examples must be a positive number, got {num_examples!r}")
        self.num_examples = num_examples
        self._scale: Optional[float] = None
        self.curvature = curvature
        self.mode = mode
        self.backend = backend
        self.cache_graphs = cache_graphs
        self.cache_budget = cache_budget
        #: cache_graphs="auto": what `memory.cache_fits` decided on the first product.
        self.cache_decision: Optional[Dict[str, Any]] = None
        self.check_finite = check_finite
        self.distributed = dist.active(distributed)
        self._range: Optional[Tuple[int, int]] = None
        self.n_matvec = 0
        self.n_batch_products = 0
        #: Called with the CG state after each iteration (XLA cuts its graph there).
        self.sync: Optional[Callable[[list], None]] = None
        self._model = model
        self._fn = _Functional(model, space, loss_fn)
        product = (_hessian_product if curvature == "hessian" else _ggn_product)(self._fn, mode)
        grad_fn = grad_and_value(self._fn.loss)
        if backend in ("compile", "openxla"):
            compile_backend = "inductor" if backend == "compile" else "openxla"
            product = torch.compile(product, backend=compile_backend, dynamic=None)
            grad_fn = torch.compile(grad_fn, backend=compile_backend, dynamic=None)
        elif backend != "eager":
            raise ValueError(f"backend must be 'eager', 'compile' or 'openxla', got {backend!r}")
        self._product = product
        self._grad = grad_fn
        self._graphs: Dict[int, Tuple[Params, Tuple[torch.Tensor, ...]]] = {}

    @property
    def params(self) -> Params:
        return tuple(self.space.detached())

    # ------------------------------------------------------------------ gradients
    def gradient(self, batches: Sequence[Any], what: str = "loss") -> Tuple[torch.Tensor, float]:
        """Weighted mean gradient (flat) and mean loss over `batches` (and over ranks)."""
        params = self.params
        total = torch.zeros(self.space.numel, dtype=self.space.dtype, device=self.space.device)
        views = self.space.unflatten(total)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.space.device)
        n_all = 0.0
        sizes = batch_weights(self._size, batches)  # before the loop: no syncs inside it
        for i, b in enumerate(batches):
            n = sizes[i]
            g, loss = self._grad(params, b)
            if self.check_finite and not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"{what} is {float(loss)} on batch {i}")
            torch._foreach_add_(views, g, alpha=float(n))
            loss_sum += loss.detach().to(torch.float64) * n
            n_all += n
        counts = torch.stack(
            [loss_sum, torch.tensor(float(n_all), dtype=torch.float64, device=loss_sum.device)]
        )
        total, counts = self._all_reduce(total, counts)
        n_all = float(counts[1])
        if n_all == 0:
            raise ValueError(f"no samples to compute the {what} gradient on")
        total /= n_all
        mean_loss = float(counts[0]) / n_all
        if self.num_examples is not None:
            scale = self.scale()
            total *= scale
            mean_loss *= scale
        if not math.isfinite(mean_loss):
            raise NonFiniteError(f"the mean {what} is {mean_loss}")
        if not bool(torch.isfinite(total).all()):
            bad = int((~torch.isfinite(total)).nonzero()[0, 0])
            name, idx = self._where(bad)
            raise NonFiniteError(f"the {what} gradient is not finite at {name}{list(idx)}")
        return total, mean_loss

    def _all_reduce(self, vec: torch.Tensor, counts: torch.Tensor):
        """Sums over ranks when torch.distributed is initialised (data-parallel shards)."""
        if self.distributed:
            dist = torch.distributed
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return vec, counts

    def scale(self) -> float:
        """Sum of the batches' weights (over ranks) / `num_examples`; 1 without it."""
        if self.num_examples is None:
            return 1.0
        if self._scale is None:
            w = torch.tensor([sum(self.weights)], dtype=torch.float64, device=self.space.device)
            if self.distributed:
                torch.distributed.all_reduce(w, op=torch.distributed.ReduceOp.SUM)
            self._scale = float(w[0]) / self.num_examples
        return self._scale

    def global_batches(self) -> Tuple[int, int]:
        """(global index of this rank's first batch, batches over all ranks): the union is
        the ranks' batches in rank order (`mftx.core.dist`). Collective on first call."""
        if self._range is None:
            self._range = dist.global_range(len(self.batches), self.distributed)
        return self._range

    def _where(self, flat: int):
        return self.space.locate(*FlatIndex(self.space.numels).split(flat))

    # ------------------------------------------------------------------ products
    def _build_graph(self, i: int, params: Params) -> Tuple[Params, Tuple[torch.Tensor, ...]]:
        """Leaves and the first-order graph's outputs for batch i: the gradient (Hessian);
        for the GGN the outputs z, a dummy u and Jᵀu with its graph (linear in u: a backward
        pass through it gives J v for any v, so each product needs two passes, no forward)."""
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_() for p in params)
            if self.curvature == "hessian":
                loss = self._fn.loss(leaves, self.batches[i])
                return leaves, torch.autograd.grad(loss, leaves, create_graph=True)
            z = self._fn.outputs(leaves, self.batches[i])
            u = torch.zeros_like(z, requires_grad=True)
            jtu = torch.autograd.grad(z, leaves, grad_outputs=u, create_graph=True)
            return leaves, (z, u, *jtu)

    def _decide_caching(self, i: int, params: Params) -> None:
        """cache_graphs="auto": build batch i's graph, measure it, keep graphs if all fit."""
        available = memory.available_bytes(self.space.device)
        batch = self.batches[i]
        resident = [*self._model.parameters(), *self._model.buffers()]
        resident += [t for t in (batch.values() if isinstance(batch, dict) else batch)
                     if isinstance(t, torch.Tensor)]  # fmt: skip
        with memory.saved_bytes(resident) as counter:
            graph = self._build_graph(i, params)
        for t in graph[1]:
            counter.add(t)
        sizes = [memory.input_numel(batch)]
        sizes += [memory.input_numel(b) for j, b in enumerate(self.batches) if j != i]
        self.cache_decision = memory.cache_fits(counter.bytes, sizes, available, self.cache_budget)
        if self.cache_decision["cached"]:
            self._graphs[i] = graph
        log.info(
            "cache_graphs='auto': %s (graphs of %d batches about %.3g GiB, budget %.3g GiB)",
            "caching" if self.cache_decision["cached"] else "not caching",
            len(self.batches),
            self.cache_decision["estimated_bytes"] / 2**30,
            self.cache_budget * (available or 0) / 2**30,
        )

    @property
    def caching(self) -> bool:
        """Whether products run through kept graphs (for "auto": once decided)."""
        if self.cache_graphs == "auto":
            return bool(self.cache_decision and self.cache_decision["cached"])
        return bool(self.cache_graphs)

    def _batch_product(self, i: int, params: Params, v: Params) -> Tuple[torch.Tensor, ...]:
        self.n_batch_products += 1
        if self.cache_graphs == "auto" and self.cache_decision is None:
            self._decide_caching(i, params)
        if not self.caching:
            return self._product(params, v, self.batches[i])
        if i not in self._graphs:
            self._graphs[i] = self._build_graph(i, params)
        leaves, g = self._graphs[i]
        if self.curvature == "hessian":
            return torch.autograd.grad(g, leaves, grad_outputs=v, retain_graph=True)
        z, u, jtu = g[0], g[1], g[2:]
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v, retain_graph=True)
            loss_z = lambda zz: self._fn.loss_on_outputs(zz, self.batches[i])  # noqa: E731
            zl = z.detach().requires_grad_()
            (gz,) = torch.autograd.grad(loss_z(zl), zl, create_graph=True)
            (hjv,) = torch.autograd.grad(gz, zl, grad_outputs=jv)
        return torch.autograd.grad(z, leaves, grad_outputs=hjv, retain_graph=True)

    def _rows(self, v: torch.Tensor) -> List[torch.Tensor]:
        """Views of the (k, n) matrix `v` as (k, *shape) tensors, one per parameter."""
        return [
            c.view(v.shape[0], *sh)
            for c, sh in zip(torch.split(v, self.space.numels, 1), self.space.shapes)
        ]

    def _batched_product(self, i: int, params: Params, V: Tuple[torch.Tensor, ...]):
        """The products of batch i with the k stacked tangents `V` ((k, *shape) each): the
        forward and first backward pass are shared (eager ``rev-rev``: `torch.func.vmap`
        over the vjp; ``double-backward``: k backward passes through one graph)."""
        self.n_batch_products += 1
        if self.cache_graphs == "auto" and self.cache_decision is None:
            self._decide_caching(i, params)
        batch = self.batches[i]
        k = len(V[0])
        if self.curvature == "hessian" and self.mode == "double-backward" and not self.caching:
            # One graph for the k tangents, then k backward passes through it (batching them
            # with is_grads_batched measured slower than this on all-MiniLM-L6-v2).
            leaves, g = self._build_graph(i, params)
            rows = [
                torch.autograd.grad(g, leaves, grad_outputs=tuple(t[j] for t in V),
                                    retain_graph=j < k - 1)
                for j in range(k)
            ]  # fmt: skip
            return tuple(torch.stack([r[t] for r in rows]) for t in range(len(V)))
        if self.backend == "eager" and not self.caching and self.mode == "rev-rev":
            fn = self._fn
            if self.curvature == "hessian":
                _, vjp_fn = vjp(lambda p: grad(fn.loss)(p, batch), params)
                return vmap(vjp_fn)(V)[0]
            z, vjp_fn = vjp(lambda p: fn.outputs(p, batch), params)
            _, lin_vjp = vjp(vjp_fn, torch.zeros_like(z))
            zd = z.detach()
            loss_z = lambda zz: fn.loss_on_outputs(zz, batch)  # noqa: E731

            def one(v):
                (jv,) = lin_vjp((v,))
                return vjp_fn(vjp(grad(loss_z), zd)[1](jv)[0])[0]

            return vmap(one)(V)
        # Anything else: one product per tangent. With cached graphs that shares everything
        # there is to share already (the graph is built once for all products).
        self.n_batch_products -= 1
        rows = [self._batch_product(i, params, tuple(t[j] for t in V)) for j in range(len(V[0]))]
        return tuple(torch.stack([r[t] for r in rows]) for t in range(len(V)))

    def matvec(self, v: torch.Tensor, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The curvature times flat `v`, averaged over the batches (or those in `indices`;
        distributed: global indices into the union, see `global_batches`).

        `v` may be a (k, n) matrix of k vectors (rows): the k products then share each
        batch's forward and first backward pass where that saves work (eager ``rev-rev``
        Hessian and GGN products; uncached ``double-backward`` Hessian products; with cached
        graphs the k products run through the kept graph one after another) and count as
        one in `n_matvec`.
        """
        self.n_matvec += 1
        idx = range(len(self.batches)) if indices is None else indices
        if indices is not None and self.distributed:
            offset, _ = self.global_batches()
            idx = [i - offset for i in indices if 0 <= i - offset < len(self.batches)]
        params = self.params
        batched = v.dim() == 2
        if batched:
            if v.shape[1] != self.space.numel:
                raise ValueError(f"expected (k, {self.space.numel}) vectors, got {tuple(v.shape)}")
            vt = tuple(self._rows(v))
        else:
            vt = tuple(self.space.unflatten(v))
        out = torch.zeros_like(v)
        views = self._rows(out) if batched else self.space.unflatten(out)
        n_all = 0
        for i in idx:
            if batched:
                hv = self._batched_product(i, params, vt)
            else:
                hv = self._batch_product(i, params, vt)
            torch._foreach_add_(views, list(hv), alpha=float(self.weights[i]))
            n_all += self.weights[i]
            del hv
        if self.distributed:
            count = torch.tensor([float(n_all)], dtype=torch.float64, device=out.device)
            out, count = self._all_reduce(out, count)
            n_all = float(count[0])
        if n_all == 0:
            raise ValueError("the curvature's batches weigh nothing (every batch size is 0)")
        out /= n_all
        if self.num_examples is not None:
            out *= self.scale()
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteError(
                f"the {self.curvature}-vector product is not finite (mode {self.mode}); "
                "check the model and data for overflow"
            )
        return out

    def release(self) -> None:
        """Drop cached graphs."""
        self._graphs.clear()

    def dense(self) -> torch.Tensor:
        """The full matrix, one product per column (small parameter spaces only)."""
        n = self.space.numel
        cols = []
        e = torch.zeros(n, dtype=self.space.dtype, device=self.space.device)
        for j in range(n):
            e.zero_()
            e[j] = 1
            cols.append(self.matvec(e))
        return torch.stack(cols, dim=1)
