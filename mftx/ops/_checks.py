"""Argument checks shared by the compiled and the reference paths.

They run before any work and before any write, and raise with a message that
names the problem. Data-dependent checks (index ranges) are skipped while
`torch.compile` traces, where the compiled op checks instead.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Sequence

import torch

from ._candidates import Candidates


def tensor_list(tensors: Sequence[torch.Tensor], what: str = "tensors") -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{what} must be a list of tensors, not a single tensor")
    try:
        out = list(tensors)
    except TypeError:
        raise TypeError(f"{what} must be a list of tensors, got {type(tensors).__name__}") from None
    device = None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; a floating-point dtype is needed")
        if t.layout != torch.strided:
            raise TypeError(f"{what}[{i}] has layout {t.layout}; only dense tensors are supported")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device}, {what}[0] on {device}")
    return out


def k_value(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return k


def threshold_value(threshold: float) -> float:
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.item()
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return threshold


def finite_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def lr_value(lr: float) -> float:
    return finite_nonnegative("lr", lr)


def same_shapes(params: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} params but {len(grads)} grads")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(
                f"params[{i}] has shape {tuple(p.shape)} but grads[{i}] {tuple(g.shape)}"
            )
    if params and grads and params[0].device != grads[0].device:
        raise ValueError(f"params on {params[0].device} but grads on {grads[0].device}")


def mask_target(tensors: List[torch.Tensor], cands: Candidates) -> None:
    if not isinstance(cands, Candidates):
        raise TypeError(f"cands must be Candidates, got {type(cands).__name__}")
    if tensors:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise TypeError(f"tensors must share one dtype, got {sorted(map(str, dtypes))}")
    if torch.compiler.is_compiling() or len(cands) == 0:
        return
    if not tensors:
        raise IndexError(f"{len(cands)} candidates but no tensors")
    ti, fi = cands.tensor_index, cands.flat_index
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    t_ok = (ti >= 0) & (ti < len(tensors))
    limit = numel[ti.clamp(0, len(tensors) - 1)]
    bad = ~(t_ok & (fi >= 0) & (fi < limit))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"candidate {i} (tensor index {int(ti[i])}, flat index {int(fi[i])}) is out of range"
        )


def saved_values(tensors: List[torch.Tensor], cands: Candidates, saved: torch.Tensor) -> None:
    if not isinstance(saved, torch.Tensor):
        raise TypeError(f"saved must be the tensor returned by mask_, got {type(saved).__name__}")
    if saved.dim() != 1 or saved.shape[0] != len(cands):
        raise ValueError(
            f"saved holds {tuple(saved.shape)} values for {len(cands)} candidates; "
            "pass the tensor mask_ returned for these candidates"
        )
    if tensors and saved.dtype != tensors[0].dtype:
        raise TypeError(f"saved has dtype {saved.dtype}, tensors {tensors[0].dtype}")
    if tensors and saved.device != tensors[0].device:
        raise ValueError(
            f"saved is on {saved.device}, tensors on {tensors[0].device}; "
            "pass the tensor mask_ returned for these tensors"
        )


def nan_message(what: str, t: int, f: int) -> str:
    return f"NaN in {what}: tensor index {t}, flat position {f}"
