"""Candidate gathering and masking over lists of tensors.

Each op runs the compiled kernel (`mftx.ops._C`) when every tensor is a CPU,
contiguous float32 tensor and the module loaded (`HAS_CPP`); anything else
(other dtypes, devices, strides, or ``MFTX_DISABLE_CPP=1``) takes the
pure-PyTorch twin in `mftx.ops.reference`, with the same results.

Also here: `indexing` (flat positions in a list of tensors) and `selfcheck`
(``mftx selfcheck``). The compiled module is `mftx.ops._C`. May import
`mftx._version` and `mftx.errors` only: the bottom layer of the package.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from . import _checks, reference
from ._candidates import Candidates
from ._compiled import HAS_CPP, IMPORT_ERROR, get_num_threads, set_num_threads

__all__ = [
    "HAS_CPP",
    "IMPORT_ERROR",
    "Candidates",
    "get_num_threads",
    "mask_",
    "reference",
    "restore_",
    "select",
    "set_num_threads",
    "topk",
    "toward_zero",
    "uses_cpp",
]

if HAS_CPP:
    from . import _compiled as _ops


def uses_cpp(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled kernel takes these tensors (CPU, contiguous, float32)."""
    # Dynamo cannot trace is_conj()/is_neg() (they return bools, not tensors);
    # while compiling, fake tensors carry no such lazy bits, so skip them there.
    tracing = torch.compiler.is_compiling()
    return HAS_CPP and all(
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
        and (tracing or not (t.is_conj() or t.is_neg()))
        for t in tensors
    )


def _wrap(out) -> Candidates:
    return Candidates(*out)


def topk(tensors: Sequence[torch.Tensor], k: int, largest: bool = True) -> Candidates:
    """The `k` most extreme values across `tensors` (any shapes), most extreme first.

    Ties are broken by (tensor index, flat index) ascending; NaN raises
    ValueError naming where it is; ±inf are ordinary values; k larger than the
    number of entries returns them all. No concatenated copy is made.
    """
    tensors: List[torch.Tensor] = _checks.tensor_list(tensors)
    k = _checks.k_value(k)
    if not tensors or not uses_cpp(tensors):
        return reference.topk(tensors, k, largest)
    return _wrap(_ops.topk_op(tensors, k, bool(largest)))


def select(tensors: Sequence[torch.Tensor], threshold: float, below: bool = True) -> Candidates:
    """Every entry strictly below `threshold` (above, with ``below=False``), most extreme first."""
    tensors = _checks.tensor_list(tensors)
    threshold = _checks.threshold_value(threshold)
    if not tensors or not uses_cpp(tensors):
        return reference.select(tensors, threshold, below)
    return _wrap(_ops.select_op(tensors, threshold, bool(below)))


def toward_zero(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float
) -> Candidates:
    """The first-order rule: entries with |θ − lr·g| < |θ|, largest |θ| − |θ − lr·g| first.

    Computed in float64 without full-size temporaries on the compiled path.
    """
    params = _checks.tensor_list(params, "params")
    grads = _checks.tensor_list(grads, "grads")
    _checks.same_shapes(params, grads)
    lr = _checks.lr_value(lr)
    if not params or not uses_cpp(params + grads):
        return reference.toward_zero(params, grads, lr)
    return _wrap(_ops.toward_zero_op(params, grads, lr))


def mask_(tensors: Sequence[torch.Tensor], cands: Candidates) -> torch.Tensor:
    """Zero the candidates' entries in place and return their previous values.

    Everything is checked before the first write. Duplicate entries are allowed.
    Pass the returned tensor to `restore_` to put the values back bit for bit.
    """
    tensors = _checks.tensor_list(tensors)
    _checks.mask_target(tensors, cands)
    if not tensors or len(cands) == 0 or not uses_cpp(tensors):
        return reference.mask_(tensors, cands)
    with torch.no_grad():
        # The kernel reads the index buffers directly: hand it contiguous ones
        # (a Candidates built from strided views is legal).
        return _ops.mask_op(tensors, cands.tensor_index.contiguous(), cands.flat_index.contiguous())


def restore_(tensors: Sequence[torch.Tensor], cands: Candidates, saved: torch.Tensor) -> None:
    """Undo `mask_`: write `saved` back into the candidates' entries, bit for bit.

    Restore masks in the reverse order they were applied.
    """
    tensors = _checks.tensor_list(tensors)
    _checks.mask_target(tensors, cands)
    _checks.saved_values(tensors, cands, saved)
    if not tensors or len(cands) == 0 or not uses_cpp(tensors) or not uses_cpp([saved]):
        return reference.restore_(tensors, cands, saved)
    with torch.no_grad():
        _ops.restore_op(
            tensors, cands.tensor_index.contiguous(), cands.flat_index.contiguous(), saved
        )
