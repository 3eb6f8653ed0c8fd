"""The FSDP2 cases shared by tests/_fsdp_worker.py and tests/test_sharded.py."""

import torch
import torch.nn.functional as F
from torch import nn

import mftx

K = 9

METHODS = {
    "gradient": {"method": "gradient", "lr": 0.05},
    "taylor": {"method": "taylor"},
    "magnitude": {"method": "magnitude"},
    "ekfac-sampled": {"method": "influence", "solver": "ekfac", "damping": 0.1, "seed": 3},
    "ekfac-empirical": {
        "method": "influence",
        "solver": "ekfac",
        "fisher": "empirical",
        "damping": "auto",
    },
}


def problem(seed: int = 0):
    """An MLP (rows 7 and 3: uneven shards on 2 ranks), float64; some equal weights so that
    the magnitude top-k has ties across ranks; 5 training and 3 validation batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        model[0].weight[0, 1] = model[0].weight[6, 2] = model[2].weight[2, 0] = 1e-3
        model[0].weight[3, 4] = -1e-3

    def mk(n):
        return {"x": torch.randn(n, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (n,))}

    train = [mk(n) for n in (4, 3, 5, 2, 6)]
    val = [mk(6), mk(3), mk(4)]
    objective = mftx.Objective(
        lambda m, b: m(b["x"]), lambda z, b: F.cross_entropy(z, b["labels"]), requires=("labels",)
    )
    return model, train, val, objective
