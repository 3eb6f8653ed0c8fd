"""Gradients and curvature-vector products of a loss over a dataset.

Everything is taken with respect to the analysed parameters only (a `ParamSpace`);
the model's other parameters and buffers stay fixed. A dataset's gradient or
product is the batch-size-weighted mean over its batches, so it equals the
gradient or product of the mean loss over all samples.

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
  passes (memory: one graph per batch).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp

from .errors import NonFiniteError
from .indexing import FlatIndex
from .objective import Objective, batch_size
from .params import ParamSpace

__all__ = ["CURVATURES", "MODES", "Curvature"]

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


class Curvature:
    """Gradients and curvature products of `loss_fn` over `batches`, on flat vectors.

    `matvec(v)` returns the batch-size-weighted mean of the per-batch products
    (or over the batches named by `indices`). `gradient(batches)` returns the
    weighted mean gradient and mean loss of any list of batches.
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
        if cache_graphs and mode != "double-backward":
            raise ValueError("cache_graphs=True needs mode='double-backward'")
        if backend == "compile" and mode == "double-backward":
            raise ValueError(
                "backend='compile' traces torch.func transforms; use mode 'rev-rev' or 'fwd-rev' "
                "(torch.autograd.grad inside torch.compile breaks the graph)"
            )
        self.space = space
        self.batches = list(batches)
        self.weights = [batch_size(b) for b in self.batches]
        self.curvature = curvature
        self.mode = mode
        self.backend = backend
        self.cache_graphs = cache_graphs
        self.check_finite = check_finite
        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.distributed = bool(distributed)
        self.n_matvec = 0
        self.n_batch_products = 0
        #: Called with the CG state after each iteration (XLA cuts its graph there).
        self.sync: Optional[Callable[[list], None]] = None
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
        n_all = 0
        for i, b in enumerate(batches):
            n = batch_size(b)
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

    def _where(self, flat: int):
        return self.space.locate(*FlatIndex(self.space.numels).split(flat))

    # ------------------------------------------------------------------ products
    def _batch_product(self, i: int, params: Params, v: Params) -> Tuple[torch.Tensor, ...]:
        self.n_batch_products += 1
        if not self.cache_graphs:
            return self._product(params, v, self.batches[i])
        if i not in self._graphs:
            with torch.enable_grad():
                leaves = tuple(p.detach().requires_grad_() for p in params)
                if self.curvature == "hessian":
                    loss = self._fn.loss(leaves, self.batches[i])
                    g = torch.autograd.grad(loss, leaves, create_graph=True)
                    self._graphs[i] = (leaves, g)
                else:
                    z = self._fn.outputs(leaves, self.batches[i])
                    self._graphs[i] = (leaves, (z,))
        leaves, g = self._graphs[i]
        if self.curvature == "hessian":
            return torch.autograd.grad(g, leaves, grad_outputs=v, retain_graph=True)
        (z,) = g
        u = torch.zeros_like(z, requires_grad=True)
        with torch.enable_grad():
            jtu = torch.autograd.grad(z, leaves, grad_outputs=u, create_graph=True)
            (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v)
            loss_z = lambda zz: self._fn.loss_on_outputs(zz, self.batches[i])  # noqa: E731
            zl = z.detach().requires_grad_()
            (gz,) = torch.autograd.grad(loss_z(zl), zl, create_graph=True)
            (hjv,) = torch.autograd.grad(gz, zl, grad_outputs=jv)
        return torch.autograd.grad(z, leaves, grad_outputs=hjv, retain_graph=True)

    def matvec(self, v: torch.Tensor, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The curvature times flat `v`, averaged over the batches (or those in `indices`)."""
        self.n_matvec += 1
        idx = range(len(self.batches)) if indices is None else indices
        params = self.params
        vt = tuple(self.space.unflatten(v))
        out = torch.zeros_like(v)
        views = self.space.unflatten(out)
        n_all = 0
        for i in idx:
            hv = self._batch_product(i, params, vt)
            torch._foreach_add_(views, list(hv), alpha=float(self.weights[i]))
            n_all += self.weights[i]
            del hv
        if self.distributed:
            count = torch.tensor([float(n_all)], dtype=torch.float64, device=out.device)
            out, count = self._all_reduce(out, count)
            n_all = float(count[0])
        out /= n_all
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
