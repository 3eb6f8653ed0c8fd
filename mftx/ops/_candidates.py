"""`Candidates`: a ranked list of entries spread over a list of tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Tuple, Union

import torch

__all__ = ["Candidates"]

_KEYS = ("tensor_index", "flat_index", "value")


@dataclass(frozen=True, eq=False)
class Candidates:
    """Entries of a list of tensors, most worth acting on first.

    Entry ``i`` is element ``flat_index[i]`` (row-major position) of tensor
    ``tensor_index[i]`` of the list the candidates were computed from; ``value[i]``
    is the score that ranked it. The three tensors are 1-D, on the CPU, of equal
    length: int64, int64 and float32.

    ``len(c)``, ``c[:k]`` (a new `Candidates`), ``c[i]`` and iteration (rank order)
    give ``(tensor_index, flat_index, value)`` as Python numbers.
    """

    tensor_index: torch.Tensor
    flat_index: torch.Tensor
    value: torch.Tensor

    def __post_init__(self) -> None:
        if torch.compiler.is_compiling():
            return  # built by the ops themselves; data-dependent checks would break the graph
        for key, dtype in zip(_KEYS, (torch.int64, torch.int64, torch.float32)):
            t = getattr(self, key)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Candidates.{key} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype or t.dim() != 1 or t.device.type != "cpu":
                raise TypeError(
                    f"Candidates.{key} must be a 1-D {dtype} CPU tensor, got "
                    f"{t.dim()}-D {t.dtype} on {t.device}"
                )
        n = {len(self.tensor_index), len(self.flat_index), len(self.value)}
        if len(n) != 1:
            raise ValueError(
                "Candidates tensors differ in length: "
                f"{len(self.tensor_index)}, {len(self.flat_index)}, {len(self.value)}"
            )

    @classmethod
    def empty(cls) -> Candidates:
        z = torch.empty(0, dtype=torch.int64)
        return cls(z, z.clone(), torch.empty(0, dtype=torch.float32))

    def __len__(self) -> int:
        return self.tensor_index.shape[0]

    def __getitem__(self, key: Union[int, slice]) -> Union[Candidates, Tuple[int, int, float]]:
        if isinstance(key, slice):
            return Candidates(
                self.tensor_index[key].contiguous(),
                self.flat_index[key].contiguous(),
                self.value[key].contiguous(),
            )
        if isinstance(key, int):
            return (
                int(self.tensor_index[key]),
                int(self.flat_index[key]),
                float(self.value[key]),
            )
        raise TypeError(f"Candidates indices must be int or slice, not {type(key).__name__}")

    def __iter__(self) -> Iterator[Tuple[int, int, float]]:
        return zip(self.tensor_index.tolist(), self.flat_index.tolist(), self.value.tolist())

    def __repr__(self) -> str:
        head = ", ".join(f"({t}, {f}, {v:.4g})" for t, f, v in list(self[:3]))
        more = ", ..." if len(self) > 3 else ""
        return f"Candidates(n={len(self)}: [{head}{more}])"

    def equal(self, other: Candidates) -> bool:
        """Same entries in the same order with bitwise-equal values."""
        return (
            len(self) == len(other)
            and torch.equal(self.tensor_index, other.tensor_index)
            and torch.equal(self.flat_index, other.flat_index)
            and torch.equal(self.value.view(torch.int32), other.value.view(torch.int32))
        )

    def to_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors keyed by field name, ready for `safetensors.torch.save_file`."""
        return {k: getattr(self, k).contiguous() for k in _KEYS}

    @classmethod
    def from_dict(cls, d: Dict[str, torch.Tensor], prefix: str = "") -> Candidates:
        missing = [prefix + k for k in _KEYS if prefix + k not in d]
        if missing:
            raise KeyError(f"Candidates.from_dict: missing {', '.join(missing)}")
        return cls(*(d[prefix + k] for k in _KEYS))
