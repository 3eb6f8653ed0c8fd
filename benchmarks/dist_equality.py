"""How far each data-parallel rank is from one process on the union, per method and solver.

    OMP_NUM_THREADS=1 python benchmarks/dist_equality.py [--world 3]

Runs tests/_dist_worker.py under torchrun (gloo, contiguous uneven shards, some empty) for
every case of tests/_dist_cases.py, then the same cases in this process on the union, and
prints the largest relative difference over the ranks (‖rank − one‖ / ‖one‖) per case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from _dist_cases import CASES, PROBLEMS, flat, run  # noqa: E402

import mftx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.world}", str(TESTS / "_dist_worker.py"), tmp,
               ",".join(CASES)]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        print(f"| case | max relative difference over {args.world} ranks |")
        print("| :-- | --: |")
        for name, (problem, kind, _) in CASES.items():
            _, train, val, _, _ = PROBLEMS[problem]()
            want = flat(run(name, train, val, distributed=False))
            worst = 0.0
            for r in range(args.world):
                f = Path(tmp) / f"{name}-rank{r}.{'json' if kind == 'spectrum' else 'safetensors'}"
                got = flat(mftx.Spectrum.load(f) if kind == "spectrum" else mftx.Scores.load(f))
                worst = max(worst, float((got - want).norm() / want.norm()))
            print(f"| {name} | {worst:.1e} |")


if __name__ == "__main__":
    main()
