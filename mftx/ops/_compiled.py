"""Loading of the compiled module `mftx.ops._C` and its registration as torch ops.

The ops are declared with `torch.library.custom_op` so that in-place masking
bumps autograd's version counters (backward through a masked weight raises the
usual in-place error) and `torch.compile(fullgraph=True)` traces calls to them
through their fake kernels.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .._version import __version__

Tensor = torch.Tensor

# The C++ source beside the package in a source checkout (editable installs); absent
# from installed wheels, where the version alone identifies the build.
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "mftx_ops.cpp"


def stale_build(module, source: Path = SOURCE) -> Optional[str]:
    """Why `module` (a loaded mftx.ops._C) does not belong to this package, or None.

    The build carries the package version and the SHA-256 of its C++ source
    (CMakeLists.txt compiles both in); a module from an older build, or from
    other C++ source than the checkout's, would run other kernels than the code
    beside it expects.
    """
    built = getattr(module, "__version__", None)
    if built != __version__:
        return (
            f"it was built for mftx {built or 'an unknown version (an older build)'}, "
            f"this package is mftx {__version__}"
        )
    if source.is_file():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if getattr(module, "__source_sha256__", None) != digest:
            return f"it was built from other C++ source than {source}"
    return None


_C = None
IMPORT_ERROR: Optional[str] = None

if os.environ.get("MFTX_DISABLE_CPP", "").strip().lower() not in ("", "0", "false", "no"):
    IMPORT_ERROR = "disabled by MFTX_DISABLE_CPP"
else:
    try:
        from . import _C  # type: ignore[no-redef]
    except ImportError as exc:  # reported, never hidden
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        advice = "Reinstall mftx (pip install --force-reinstall mftx)"
    else:
        stale = stale_build(_C)
        if stale is not None:
            _C = None
            IMPORT_ERROR = f"stale build: {stale}"
            advice = "Rebuild it: `pip install -e .` in the source checkout (or reinstall mftx)"
    if IMPORT_ERROR is not None:
        warnings.warn(
            f"mftx: the compiled ops (mftx.ops._C) failed to load ({IMPORT_ERROR}); "
            f"falling back to the pure-PyTorch reference path. {advice}, "
            "or set MFTX_DISABLE_CPP=1 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )

HAS_CPP: bool = _C is not None

_num_threads: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Threads used by the compiled ops; None follows `torch.get_num_threads()`."""
    global _num_threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def _arrays(tensors: List[Tensor]):
    return [t.detach().view(-1).numpy() for t in tensors]


def _as_tensors(out) -> Tuple[Tensor, Tensor, Tensor]:
    ti, fi, v = out
    return torch.from_numpy(ti), torch.from_numpy(fi), torch.from_numpy(v)


def _outputs_not_differentiable(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


def _never_called(ctx, *grads):
    raise AssertionError("mftx ranking ops have no differentiable outputs")


def _rank_only(op) -> None:
    """Candidates are a ranking, not a function to differentiate: like the reference
    twins (which read detached tensors), outputs never require grad, also for
    inputs that do. Mutating ops (mask_, restore_) cannot register autograd; the
    public wrappers call them under `torch.no_grad()`."""
    op.register_autograd(_never_called, setup_context=_outputs_not_differentiable)


def _dynamic_empty_like_candidates():
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        torch.empty(n, dtype=torch.int64),
        torch.empty(n, dtype=torch.int64),
        torch.empty(n, dtype=torch.float32),
    )


if HAS_CPP:

    @torch.library.custom_op("mftx::topk", mutates_args=(), device_types="cpu")
    def topk_op(tensors: List[Tensor], k: int, largest: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _as_tensors(_C.topk(_arrays(tensors), k, largest, get_num_threads()))

    @topk_op.register_fake
    def _(tensors, k, largest):
        m = torch.sym_min(k, sum(t.numel() for t in tensors))
        return (
            torch.empty(m, dtype=torch.int64),
            torch.empty(m, dtype=torch.int64),
            torch.empty(m, dtype=torch.float32),
        )

    @torch.library.custom_op("mftx::select", mutates_args=(), device_types="cpu")
    def select_op(
        tensors: List[Tensor], threshold: float, below: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _as_tensors(_C.select(_arrays(tensors), threshold, below, get_num_threads()))

    @select_op.register_fake
    def _(tensors, threshold, below):
        return _dynamic_empty_like_candidates()

    _rank_only(topk_op)
    _rank_only(select_op)

    @torch.library.custom_op("mftx::toward_zero", mutates_args=(), device_types="cpu")
    def toward_zero_op(
        params: List[Tensor], grads: List[Tensor], lr: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _as_tensors(_C.toward_zero(_arrays(params), _arrays(grads), lr, get_num_threads()))

    @toward_zero_op.register_fake
    def _(params, grads, lr):
        return _dynamic_empty_like_candidates()

    _rank_only(toward_zero_op)

    @torch.library.custom_op("mftx::mask_", mutates_args=("tensors",), device_types="cpu")
    def mask_op(tensors: List[Tensor], tensor_index: Tensor, flat_index: Tensor) -> Tensor:
        saved = _C.mask(
            _arrays(tensors), tensor_index.numpy(), flat_index.numpy(), get_num_threads()
        )
        return torch.from_numpy(saved)

    @mask_op.register_fake
    def _(tensors, tensor_index, flat_index):
        return torch.empty(tensor_index.shape[0], dtype=torch.float32)

    @torch.library.custom_op("mftx::restore_", mutates_args=("tensors",), device_types="cpu")
    def restore_op(
        tensors: List[Tensor], tensor_index: Tensor, flat_index: Tensor, saved: Tensor
    ) -> None:
        _C.restore(
            _arrays(tensors),
            tensor_index.numpy(),
            flat_index.numpy(),
            saved.numpy(),
            get_num_threads(),
        )

    @restore_op.register_fake
    def _(tensors, tensor_index, flat_index, saved):
        return None
