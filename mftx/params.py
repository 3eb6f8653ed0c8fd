"""The parameter space: which parameters of a model are analysed, in a fixed order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "ParamSpace", "select_params"]

#: The reference study's exclusions: the classification head, the pooler, every
#: LayerNorm and the embeddings. Patterns are `re.search`-ed in parameter names.
DEFAULT_EXCLUDE: Tuple[str, ...] = (
    r"(^|\.)classifier(\.|$)",
    r"(^|\.)pooler(\.|$)",
    r"(?i)layer_?norm",
    r"(^|\.)embeddings(\.|$)",
)


@dataclass(frozen=True, eq=False)
class ParamSpace:
    """The analysed parameters of a model: names, tensors (the live parameters), shapes.

    Vectors over the space are handled either as lists of tensors shaped like the
    parameters or as one flat 1-D tensor (`flatten` / `unflatten`), in this order.
    """

    names: Tuple[str, ...]
    params: Tuple[torch.Tensor, ...]
    model_numel: int

    def __post_init__(self) -> None:
        if len(self.names) != len(self.params):
            raise ValueError("ParamSpace: names and params differ in length")
        if not self.names:
            raise ValueError(
                "no analysed parameters: the include/exclude patterns matched nothing "
                "(see mftx.DEFAULT_EXCLUDE and select_params(include=...))"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return iter(zip(self.names, self.params))

    @property
    def shapes(self) -> Tuple[torch.Size, ...]:
        return tuple(p.shape for p in self.params)

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(p.numel() for p in self.params)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def summary(self) -> Dict[str, float]:
        """Total model parameters, analysed parameters and their share."""
        return {
            "total": self.model_numel,
            "analysed": self.numel,
            "share": self.numel / self.model_numel if self.model_numel else 0.0,
            "tensors": len(self),
        }

    def detached(self) -> List[torch.Tensor]:
        return [p.detach() for p in self.params]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters into one 1-D tensor."""
        if len(tensors) != len(self):
            raise ValueError(f"expected {len(self)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> List[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        if vec.dim() != 1 or vec.numel() != self.numel:
            raise ValueError(
                f"expected a 1-D tensor of {self.numel} entries, got {tuple(vec.shape)}"
            )
        return [c.view(s) for c, s in zip(torch.split(vec, self.numels), self.shapes)]

    def locate(self, tensor_index: int, flat_index: int) -> Tuple[str, Tuple[int, ...]]:
        """Parameter name and multi-index of entry `flat_index` of tensor `tensor_index`."""
        shape = self.shapes[tensor_index]
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))
        return self.names[tensor_index], idx


def _compile(patterns: Optional[Iterable[str]], what: str) -> List[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"invalid {what} pattern {p!r}: {exc}") from None
    return out


def select_params(
    model: nn.Module,
    include: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = DEFAULT_EXCLUDE,
) -> ParamSpace:
    """The analysed parameters of `model`, in `named_parameters()` order.

    A parameter is analysed when its name matches one of `include` (every name,
    if None) and none of `exclude` (regular expressions, `re.search`). Tied or
    shared tensors count once, under their first name.
    """
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    names, params, seen = [], [], set()
    total = 0
    for name, p in model.named_parameters():  # deduplicates shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if inc and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        names.append(name)
        params.append(p)
    if not names:
        raise ValueError(
            f"no analysed parameters in {type(model).__name__}: include={include!r} "
            f"and exclude={exclude!r} leave nothing"
        )
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"analysed parameters must share one dtype and device, got {sorted(map(str, dtypes))} "
            f"on {sorted(map(str, devices))}"
        )
    return ParamSpace(tuple(names), tuple(params), total)
