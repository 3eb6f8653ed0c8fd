"""Backends: where `mftx.score`'s products and solves run.

- `backend`: the `Backend` interface and the ``eager`` and ``compile``
  (``torch.compile``) backends; `get_backend` by name.
- `xla`: the ``xla`` backend's helpers (torch_xla: TPU, or the CPU PJRT device).

May import: `mftx.curvature`, `mftx.core`, `mftx.errors`.
"""

from .backend import BACKENDS, Backend, get_backend, to_device

__all__ = ["BACKENDS", "Backend", "get_backend", "to_device"]
