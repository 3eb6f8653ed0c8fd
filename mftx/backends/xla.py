"""``backend="xla"``: the HVP/CG inner loop as compiled XLA graphs (torch_xla).

On a TPU (or the CPU PJRT device, ``PJRT_DEVICE=CPU``, used in tests) the
model, the batches and the solver state live on the XLA device. CG or MINRES
runs a fixed number of iterations with its residual kept on the device, and
after every iteration only the solver's state tensors are synced (`sync_state`), so every
iteration runs the same compiled graph: after the first, nothing new is
compiled, nor in a second scoring run with the same shapes.

Two torch_xla 2.9 traps are handled here:
- forward-over-reverse (``jvp`` of ``grad``) returns wrong Hessian-vector
  products with mean-reduced cross-entropy: ``hvp_mode="fwd-rev"`` is refused;
  reverse-over-reverse (the default) and double backward are correct.
- transformers checks a 2-D padding mask with ``.all()`` in every forward, a
  host sync; batches get the equivalent 4-D additive mask instead, which it
  passes through untouched.

``xla_compile=True`` additionally wraps the per-batch HVP in
``torch.compile(backend="openxla")`` (reverse-over-reverse only: double backward
does not trace). Its warm-up takes two iterations, and dynamo traces each
scoring call afresh (the lazy default reuses compiled graphs across calls).

torch_xla must set up its device before autograd first runs in the process:
call ``torch_xla.device()`` (or `device()` here) at start-up, before any
backward pass; otherwise autograd's engine fails with an internal assert,
which `score` turns into an error that says so.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.params import ParamSpace, select_params

__all__ = ["additive_mask", "device", "require_xla", "sync_state", "to_device"]

INSTALL_HINT = (
    "backend='xla' needs torch_xla. Install it in its own environment, with the torch it "
    "was built for: pip install torch==2.9.0 torch-xla==2.9.0 (then run with PJRT_DEVICE=CPU "
    "for the CPU device, or on a Cloud TPU VM for TPUs)"
)


def require_xla():
    """Import torch_xla or raise ImportError saying how to install it."""
    try:
        import torch_xla
        import torch_xla.core.xla_model
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return torch_xla


def device() -> torch.device:
    return require_xla().device()


def check_config(cfg: Any) -> None:
    """Refuse settings that are wrong or host-bound on XLA, before any work."""
    if cfg.hvp_mode == "fwd-rev":
        raise ValueError(
            "hvp_mode='fwd-rev' gives wrong Hessian-vector products on torch_xla 2.9 for "
            "mean-reduced cross-entropy; use hvp_mode='rev-rev' (default) or 'double-backward'"
        )
    if cfg.xla_compile and cfg.hvp_mode != "rev-rev":
        raise ValueError("xla_compile=True traces torch.func transforms: use hvp_mode='rev-rev'")
    if cfg.cache_graphs:
        raise ValueError("cache_graphs=True keeps autograd graphs across iterations; not on XLA")
    if cfg.solver not in ("cg", "minres"):
        raise ValueError(
            f"backend='xla' solves with fixed-iteration CG or MINRES only, not {cfg.solver!r}"
            + (
                " (the default solver): pass solver='cg' or solver='minres'"
                if cfg.solver == "ekfac"
                else ""
            )
        )
    if cfg.damping == "auto":
        raise ValueError(
            "damping='auto' runs Lanczos with a host read per step; not on XLA. Estimate it "
            "eagerly (mftx.spectrum(...).auto_damping()) and pass the number"
        )


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> (B, 1, L, L) additive mask (0 keep, dtype min masked)."""
    m = mask[:, None, None, :].to(dtype)
    full = (1.0 - m) * torch.finfo(dtype).min
    return full.expand(mask.shape[0], 1, mask.shape[1], mask.shape[1]).contiguous()


def to_device(batch: Any, dev: torch.device, dtype: torch.dtype) -> Any:
    """A batch on `dev`, with a 2-D ``attention_mask`` replaced by its 4-D additive form."""
    if not isinstance(batch, dict):
        raise TypeError(
            f"backend='xla' takes batches as dicts of tensors, got {type(batch).__name__}"
        )
    out: Dict[str, Any] = {}
    for k, v in batch.items():
        if k == "attention_mask" and isinstance(v, torch.Tensor) and v.dim() == 2:
            v = additive_mask(v, dtype)
        out[k] = v.to(dev) if isinstance(v, torch.Tensor) else v
    return out


def sync_state(tensors: List[torch.Tensor]) -> None:
    """Cut the lazy graph at these tensors only (the CG state), without waiting."""
    import torch_xla

    torch_xla._XLAC._xla_sync_multi(list(tensors), devices=[], wait=False)


def prepare(
    model: nn.Module,
    train: Sequence[Any],
    val: Sequence[Any],
    params: Optional[ParamSpace],
) -> Tuple[nn.Module, List[Any], List[Any], ParamSpace]:
    """A copy of the model and the batches on the XLA device, and the matching ParamSpace."""
    dev = device()
    work = copy.deepcopy(model).to(dev)  # the caller's model stays where it is
    if params is None:
        space = select_params(work)
    else:
        own = dict(work.named_parameters())
        missing = [n for n in params.names if n not in own]
        if missing:
            raise ValueError(f"params name parameters the model does not have: {missing[:3]}")
        space = ParamSpace(
            params.names, tuple(own[n] for n in params.names), params.model_numel,
            params.excluded,
        )  # fmt: skip
    dtype = space.dtype
    return (
        work,
        [to_device(b, dev, dtype) for b in train],
        [to_device(b, dev, dtype) for b in val],
        space,
    )


ENGINE_HINT = (
    "autograd ran in this process before torch_xla set up its device: call "
    "torch_xla.device() (or mftx.backends.xla.device()) at start-up, before any backward pass"
)


def explain_error(exc: BaseException) -> Optional[BaseException]:
    """The error to raise instead of `exc` when it is a known torch_xla failure, else None.

    torch_xla 2.9 reports autograd having run before its device was set up only
    as an internal assert of the autograd engine (``device_ready_queues_``).
    """
    if isinstance(exc, RuntimeError) and "device_ready_queues_" in str(exc):
        return RuntimeError(ENGINE_HINT)
    return None


def compile_count() -> int:
    """How many XLA graphs torch_xla has compiled so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0
