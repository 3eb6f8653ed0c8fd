"""Pure-PyTorch twins of the compiled ops: same signatures, same results.

They accept any floating dtype, any device and any strides; the dispatching
functions in `mftx.ops` fall back to them for inputs the compiled ops do not
take. Order rule shared with the compiled path: by value (most extreme first),
ties (``-0.0 == +0.0`` included) by position in the virtual concatenation of the
tensors, that is by (tensor index, flat index) ascending.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from . import _checks
from ._candidates import Candidates
from .indexing import FlatIndex

__all__ = ["mask_", "restore_", "select", "topk", "toward_zero"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _first_nan(tensors: List[torch.Tensor]) -> Tuple[int, int]:
    """(tensor index, flat position) of the first NaN, or (-1, -1)."""
    for i, t in enumerate(tensors):
        nan = torch.isnan(t.detach().reshape(-1))
        if bool(nan.any()):
            return i, int(nan.nonzero()[0, 0])
    return -1, -1


def _check_nan(tensors: List[torch.Tensor], what: str) -> None:
    t, f = _first_nan(tensors)
    if t >= 0:
        raise ValueError(_checks.nan_message(what, t, f))


def _to_candidates(
    tensors: List[torch.Tensor], flat: torch.Tensor, index: torch.Tensor, largest: bool
) -> Candidates:
    """Sort entries `index` of `flat` (given in ascending order) and split indices."""
    keys = flat[index] + 0.0  # -0.0 -> +0.0: equal keys tie on position
    order = torch.sort(keys, descending=largest, stable=True).indices
    index = index[order]
    value = flat[index].to(torch.float32).cpu()
    index = index.cpu()
    tensor_index, flat_index = FlatIndex.of(tensors).split(index)
    return Candidates(tensor_index, flat_index, value)


def topk(tensors: Sequence[torch.Tensor], k: int, largest: bool = True) -> Candidates:
    """The k most extreme values across `tensors`, most extreme first."""
    tensors = _checks.tensor_list(tensors)
    k = _checks.k_value(k)
    if not tensors:
        return Candidates.empty()
    _check_nan(tensors, "scores")
    flat = _flat(tensors)
    m = min(k, flat.numel())
    if m == 0:
        return Candidates.empty()
    kth = torch.topk(flat, m, largest=largest, sorted=True).values[-1]
    strictly = (flat > kth) if largest else (flat < kth)
    n_strict = int(strictly.sum())
    ties = (flat == kth).nonzero().squeeze(1)[: m - n_strict]
    index = torch.cat([strictly.nonzero().squeeze(1), ties]).sort().values
    return _to_candidates(tensors, flat, index, largest)


def select(tensors: Sequence[torch.Tensor], threshold: float, below: bool = True) -> Candidates:
    """Every entry strictly below (or above) `threshold`, most extreme first."""
    tensors = _checks.tensor_list(tensors)
    threshold = _checks.threshold_value(threshold)
    if not tensors:
        return Candidates.empty()
    _check_nan(tensors, "scores")
    flat = _flat(tensors)
    hit = (flat < threshold) if below else (flat > threshold)
    return _to_candidates(tensors, flat, hit.nonzero().squeeze(1), largest=not below)


def toward_zero(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float
) -> Candidates:
    """Entries with |θ − lr·g| < |θ|; value |θ| − |θ − lr·g| (computed in float64)."""
    params = _checks.tensor_list(params, "params")
    grads = _checks.tensor_list(grads, "grads")
    _checks.same_shapes(params, grads)
    lr = _checks.lr_value(lr)
    if not params:
        return Candidates.empty()
    for i, (p, g) in enumerate(zip(params, grads)):
        nan = torch.isnan(p.detach().reshape(-1)) | torch.isnan(g.detach().reshape(-1))
        if bool(nan.any()):
            f = int(nan.nonzero()[0, 0])
            what = "params" if bool(torch.isnan(p.detach().reshape(-1)[f])) else "grads"
            raise ValueError(_checks.nan_message(what, i, f))
    gains = []
    for p, g in zip(params, grads):
        pd = p.detach().reshape(-1).to(torch.float64)
        step = g.detach().reshape(-1).to(torch.float64) * lr
        gains.append(pd.abs() - (pd - step).abs())
    gain = torch.cat(gains)
    index = (gain > 0).nonzero().squeeze(1)
    flat32 = gain.to(torch.float32)  # ranked on the float32 value, as reported
    return _to_candidates(params, flat32, index, largest=True)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def _locate(t: torch.Tensor, flat_index: torch.Tensor):
    if t.is_contiguous():
        return flat_index
    return torch.unravel_index(flat_index, t.shape)


def _groups(cands: Candidates):
    """(tensor index, positions in cands) for every tensor that has candidates."""
    ti = cands.tensor_index
    for t in torch.unique(ti).tolist():
        yield t, (ti == t).nonzero().squeeze(1)


def mask_(tensors: Sequence[torch.Tensor], cands: Candidates) -> torch.Tensor:
    """Zero the candidates' entries in place; return their previous values."""
    tensors = _checks.tensor_list(tensors)
    _checks.mask_target(tensors, cands)
    if len(cands) == 0:
        dtype = tensors[0].dtype if tensors else torch.float32
        device = tensors[0].device if tensors else "cpu"
        return torch.empty(0, dtype=dtype, device=device)
    device = tensors[0].device
    saved = torch.empty(len(cands), dtype=tensors[0].dtype, device=device)
    saved_bits = _int_view(saved)
    writes = []
    with torch.no_grad():
        for t, pos in _groups(cands):  # every read before the first write
            target = _int_view(tensors[t])
            where = _locate(tensors[t], cands.flat_index[pos].to(device))
            flat = target.view(-1) if tensors[t].is_contiguous() else target
            saved_bits[pos.to(device)] = flat[where]
            writes.append((flat, where))
        for flat, where in writes:
            flat[where] = 0
    return saved


def restore_(tensors: Sequence[torch.Tensor], cands: Candidates, saved: torch.Tensor) -> None:
    """Write back the values `mask_` returned, bit for bit."""
    tensors = _checks.tensor_list(tensors)
    _checks.mask_target(tensors, cands)
    _checks.saved_values(tensors, cands, saved)
    if len(cands) == 0:
        return
    device = tensors[0].device
    saved_bits = _int_view(saved.to(device))
    with torch.no_grad():
        for t, pos in _groups(cands):
            target = _int_view(tensors[t])
            where = _locate(tensors[t], cands.flat_index[pos].to(device))
            flat = target.view(-1) if tensors[t].is_contiguous() else target
            flat[where] = saved_bits[pos.to(device)]
