"""Type stub for the compiled module ``mftx.ops._C`` (source: csrc/mftx_ops.cpp).

The functions take lists of 1-D, C-contiguous NumPy views of CPU tensors
(``t.detach().view(-1).numpy()``) and never copy them: float32 buffers for the
scores, weights and saved values, int64 arrays for candidate indices. They
raise TypeError for a wrong dtype or a non-array, ValueError for
non-contiguous or read-only buffers, mismatched lengths and NaN (naming the
tensor index and flat position), and IndexError for an out-of-range
candidate, always before the first write; RuntimeError when the buffers
changed between two passes of `select`/`toward_zero`/large-k `topk` (another
thread writing to them while the GIL is released). Candidates come back as
``(tensor_index, flat_index, value)``: int64, int64 and float32 arrays in rank
order (most extreme first, ties by tensor index, then flat index).
``num_threads`` caps the OpenMP threads (one per `grain` elements); a team
OpenMP runs smaller than that (thread limits, dynamic teams, nested regions)
gives the same results. Use the wrappers in `mftx.ops`, which also register the
ops with torch.
"""

from typing import Sequence, Tuple

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]
_Candidates = Tuple[_I64, _I64, _F32]

grain: int
"""Work size (elements or candidates) below which a loop runs on one thread."""

__version__: str
"""The mftx version this module was built for (from mftx/_version.py)."""

__source_sha256__: str
"""SHA-256 of the csrc/mftx_ops.cpp it was built from."""

def topk(arrays: Sequence[_F32], k: int, largest: bool, num_threads: int) -> _Candidates:
    """The k most extreme values (k > number of entries: all of them); k < 0 raises."""

def select(arrays: Sequence[_F32], threshold: float, below: bool, num_threads: int) -> _Candidates:
    """Entries strictly below (above) ``threshold``, compared in float32."""

def toward_zero(
    params: Sequence[_F32], grads: Sequence[_F32], lr: float, num_threads: int
) -> _Candidates:
    """Entries with |p - lr*g| < |p|; value |p| - |p - lr*g| computed in float64."""

def mask(arrays: Sequence[_F32], tensor_index: _I64, flat_index: _I64, num_threads: int) -> _F32:
    """Zero the entries in place (duplicates allowed); return their previous bits."""

def restore(
    arrays: Sequence[_F32],
    tensor_index: _I64,
    flat_index: _I64,
    saved: _F32,
    num_threads: int,
) -> None:
    """Write ``saved`` (as returned by `mask`) back bit for bit."""

def has_openmp() -> bool:
    """Whether the module was built with OpenMP."""
