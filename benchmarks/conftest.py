"""Benchmark session setup.

OpenMP threads that spin at barriers steal the CPU from the other thread on a
busy machine; passive waiting makes timings steadier. It has to be set before
the OpenMP runtime starts, that is before torch is imported (an explicit value
in the environment wins).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_TORCH_WAS_IMPORTED = "torch" in sys.modules


def pytest_report_header(config):
    import torch

    import mftx.ops

    late = " (torch was imported first: not applied)" if _TORCH_WAS_IMPORTED else ""
    return (
        f"mftx benchmarks: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}{late}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"mftx.ops.HAS_CPP={mftx.ops.HAS_CPP}, mftx threads {mftx.ops.get_num_threads()}"
    )
