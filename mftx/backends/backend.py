"""Where `mftx.score` runs: one small interface, one implementation per backend.

A `Backend` checks the settings before any work (`check`), moves the model and
data where they run (`prepare`), builds the curvature operator (`curvature`)
and explains backend-specific failures (`explain`). `score_with_config` only
calls these, so a new backend is one class here.

- ``eager``: plain PyTorch on the model's device.
- ``compile``: the per-batch gradient and HVP under ``torch.compile`` (inductor).
- ``xla``: model and batches on the XLA device (torch_xla, see `mftx.backends.xla`),
  fixed-iteration CG or MINRES with only the solver's state synced per iteration.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.params import ParamSpace
from ..curvature.hvp import Curvature

__all__ = ["BACKENDS", "Backend", "get_backend", "to_device"]

Prepared = Tuple[nn.Module, List[Any], List[Any], Optional[ParamSpace], Any]


class Backend:
    """Eager PyTorch; the base of the others."""

    name = "eager"

    def check(self, cfg: Any) -> None:
        """Refuse settings the backend cannot run, before any work (ValueError)."""

    def prepare(
        self, model: nn.Module, train: List[Any], val: List[Any], params: Optional[ParamSpace],
        cfg: Any,
    ) -> Prepared:  # fmt: skip
        """The model, batches, parameter space and config the computation runs with: here
        the batches' tensors on the device of the analysed (else the model's) parameters."""
        device = params.device if params is not None else _device_of(model)
        if device is not None:
            train, val = to_device(train, device), to_device(val, device)
        return model, train, val, params, cfg

    def curvature(
        self, model: nn.Module, space: ParamSpace, batches: Sequence[Any], loss_fn: Callable,
        cfg: Any, num_examples: Optional[float] = None,
    ) -> Curvature:  # fmt: skip
        """Gradients and curvature products over `batches` for this backend (`num_examples`:
        what their dataset means divide by, see `Curvature`)."""
        return Curvature(
            model, space, batches, loss_fn, curvature=cfg.curvature, mode=cfg.hvp_mode,
            backend=self.hvp_backend(cfg), cache_graphs=cfg.cache_graphs,
            cache_budget=cfg.cache_budget, check_finite=not cfg.fixed_iterations,
            distributed=cfg.distributed, batch_size_fn=cfg.batch_size_fn,
            num_examples=num_examples,
        )  # fmt: skip

    def hvp_backend(self, cfg: Any) -> str:
        """The `Curvature` backend this one builds its operators with."""
        return "eager"

    def explain(self, exc: BaseException) -> Optional[BaseException]:
        """A clearer error for a backend-specific failure `exc`, or None to re-raise it as is."""
        return None


class CompileBackend(Backend):
    name = "compile"

    def hvp_backend(self, cfg: Any) -> str:
        return "compile"


class XLABackend(Backend):
    name = "xla"

    def check(self, cfg: Any) -> None:
        from . import xla

        xla.check_config(cfg)

    def prepare(self, model, train, val, params, cfg) -> Prepared:
        from . import xla  # optional dependency: torch_xla

        xla.require_xla()
        model, train, val, params = xla.prepare(model, train, val, params)
        return model, train, val, params, replace(cfg, fixed_iterations=True)

    def hvp_backend(self, cfg: Any) -> str:
        # eager here means lazy XLA tensors; openxla compiles the per-batch HVP.
        return "openxla" if cfg.xla_compile else "eager"

    def curvature(self, model, space, batches, loss_fn, cfg, num_examples=None) -> Curvature:
        from . import xla

        op = super().curvature(model, space, batches, loss_fn, cfg, num_examples)
        op.sync = xla.sync_state  # looked up per call: tests may patch it
        return op

    def explain(self, exc: BaseException) -> Optional[BaseException]:
        from . import xla

        return xla.explain_error(exc)


def _device_of(model: nn.Module) -> Optional[torch.device]:
    return next((p.device for p in model.parameters()), None)


def to_device(batches: List[Any], device: torch.device) -> List[Any]:
    """Batches with their tensors on `device` (those already there are not copied)."""
    out = []
    for b in batches:
        if isinstance(b, dict):
            b = {
                k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
                for k, v in b.items()
            }
        out.append(b)
    return out


_BACKENDS: Dict[str, Backend] = {b.name: b for b in (Backend(), CompileBackend(), XLABackend())}
BACKENDS = tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called `name` (ValueError naming the choices otherwise)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}") from None
