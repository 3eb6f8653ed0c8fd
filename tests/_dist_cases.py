"""The data-parallel equality cases: one problem, every method and solver, and the spectrum.

`tests/_dist_worker.py` runs each case on its rank's contiguous shard under torchrun;
`tests/test_distributed.py` runs it in one process on the union and compares.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from _toys import tiny_bert_problem
from torch import nn

import mftx


def mlp(seed: int = 0):
    """A tanh MLP, 5 training batches of unequal sizes, 2 validation batches (float64)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def mk(n):
        return {"x": torch.randn(n, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (n,))}

    train = [mk(n) for n in (4, 3, 5, 2, 6)]
    val = [mk(6), mk(3)]
    objective = mftx.Objective(
        lambda m, b: m(b["x"]), lambda z, b: F.cross_entropy(z, b["labels"]), requires=("labels",)
    )
    return model, train, val, objective, mftx.select_params(model, exclude=None)


def bert():
    model, train, val, space = tiny_bert_problem()
    return model, train, val, None, space


PROBLEMS: Dict[str, Callable] = {"mlp": mlp, "bert": bert}

_GGN = {"curvature": "ggn", "damping": 0.5}
_IT = {"tol": 1e-13, "max_iter": 500}

#: name -> (problem, "score" | "spectrum", keyword arguments)
# fmt: off
CASES: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    "gradient": ("mlp", "score", {"method": "gradient", "lr": 0.1}),
    "taylor": ("mlp", "score", {"method": "taylor"}),
    "magnitude": ("mlp", "score", {"method": "magnitude"}),
    "obd-probes": ("mlp", "score", {"method": "obd", **_GGN, "probes": 5, "seed": 3}),
    "obd-exact": ("mlp", "score", {"method": "obd", "probes": 0}),
    "minres": ("mlp", "score", {"method": "influence", "solver": "minres", **_GGN, **_IT}),
    "minres-hessian-sub": (
        "mlp", "score",
        {"method": "influence", "solver": "minres", "damping": 2.0, "hvp_batches": 3, "seed": 1,
         "num_examples": {"train": 25.0, "val": 9.0}, **_IT},
    ),
    "cg-auto": ("mlp", "score", {"method": "influence", "solver": "cg", "curvature": "ggn",
                                 "damping": "auto", "lanczos_steps": 12, **_IT}),
    "lissa": ("mlp", "score", {"method": "influence", "solver": "lissa", **_GGN,
                               "lissa_depth": 30}),
    "lissa-stochastic": (
        "mlp", "score",
        {"method": "influence", "solver": "lissa", **_GGN, "lissa_depth": 30,
         "lissa_stochastic": True, "lissa_repeats": 2, "seed": 5},
    ),
    "explicit": ("mlp", "score", {"method": "influence", "solver": "explicit", **_GGN}),
    "lanczos": ("mlp", "score", {"method": "influence", "solver": "lanczos", **_GGN, "rank": 6,
                                 "lanczos_steps": 20, "lanczos_tol": 0.0}),
    "ekfac-sampled": ("mlp", "score", {"method": "influence", "solver": "ekfac", "damping": 0.1,
                                       "seed": 7}),
    "ekfac-empirical": ("mlp", "score", {"method": "influence", "solver": "ekfac",
                                         "fisher": "empirical", "damping": "auto"}),
    "bert-ekfac": ("bert", "score", {"method": "influence", "solver": "ekfac", "damping": 0.1}),
    "bert-minres": ("bert", "score", {"method": "influence", "solver": "minres", "damping": 1.0,
                                      **_IT}),
    "bert-gradient": ("bert", "score", {"method": "gradient"}),
    "spectrum": ("mlp", "spectrum", {"curvature": "ggn", "steps": 15, "probes": 3,
                                     "probe_steps": 6, "hvp_batches": 4, "seed": 2}),
    "spectrum-hutchpp": ("bert", "spectrum", {"steps": 10, "probes": 1, "trace": "hutch++",
                                              "trace_products": 6}),
}
# fmt: on


def run(name: str, train: List[Any], val: List[Any], distributed: bool):
    """Case `name` on the given batches: `Scores` or a `Spectrum`."""
    problem, kind, kw = CASES[name]
    model, _, _, objective, space = PROBLEMS[problem]()
    with warnings.catch_warnings():  # LiSSA's fixed depth stops short, and says so
        warnings.simplefilter("ignore", mftx.ConvergenceWarning)
        return _run(kind, kw, model, objective, space, train, val, distributed)


def _run(kind, kw, model, objective, space, train, val, distributed):
    if kind == "spectrum":
        return mftx.spectrum(
            model,
            train,
            params=space,
            loss_fn=objective,
            progress=False,
            distributed=distributed,
            **kw,
        )
    return mftx.score(
        model,
        train,
        val,
        params=space,
        loss_fn=objective,
        progress=False,
        distributed=distributed,
        **kw,
    )


def flat(result) -> torch.Tensor:
    """The numbers to compare: every score, or the spectrum's Ritz values, nodes and trace."""
    if isinstance(result, mftx.Spectrum):
        nums = [*result.ritz_values, *chain(*result.nodes), *chain(*result.weights),
                result.trace, result.lambda_min_error]  # fmt: skip
        return torch.tensor(nums, dtype=torch.float64)
    return torch.cat([result.scores[n].reshape(-1) for n in result.names])
