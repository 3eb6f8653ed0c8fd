"""`mftx analyze`'s settings: `AnalyzeConfig`, and the method labels it takes (`parse_method`).

Read by the analysis stages (`mftx.study.analysis`), the held-out stages
(`mftx.study.crossfit`) and the CLI; imports only the library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

from .. import masking
from .._config import help_field
from ..curvature.hvp import CURVATURES
from ..inverse.solvers import SOLVERS
from ..scores import METHODS
from ..scoring import ScoreConfig

__all__ = [
    "DEFAULT_GROUP_KS",
    "DEFAULT_KS",
    "DEFAULT_LOCATION_KS",
    "ITERATIVE_SOLVERS",
    "AnalyzeConfig",
    "Variant",
    "count_token",
    "lanczos_steps",
    "parse_method",
]

DEFAULT_KS = (100, 500, 1000, 5000, 10000, 50000, 100000)
DEFAULT_GROUP_KS = (10, 100, 1000, 10000)
DEFAULT_LOCATION_KS = (100, 1000, 5000)


@dataclass
class AnalyzeConfig:
    """Settings of an analysis run (recorded in analysis.json)."""

    data: Optional[str] = help_field("directory with SST-2 TSVs (None: MFTX_DATA or hub)")
    train_size: Optional[int] = help_field("training rows (seeded subset; as in fine-tuning)", 1000)
    seed: Optional[int] = help_field("data seed (None: the checkpoint's own)", None)
    methods: Sequence[str] = help_field(
        "scoring methods", default_factory=lambda: ["gradient", "influence"]
    )
    ks: Sequence[int] = help_field(
        "top-k grid of the masking sweep", default_factory=lambda: list(DEFAULT_KS)
    )
    batch_size: int = help_field("training batch size for gradients and HVPs", 16)
    eval_batch_size: int = help_field("dev batch size for evaluation and validation gradients", 64)
    max_length: int = help_field("token truncation length", 64)
    lr: float = help_field("lr of the gradient rule", 2e-5)
    damping: Union[float, str] = help_field("λ of (H + λI), or 'auto' (from the spectrum)", 0.01)
    curvature: str = help_field("hessian | ggn", "hessian")
    solver: str = help_field("minres | cg | lissa | explicit | lanczos | ekfac", "minres")
    rank: int = help_field("solver='lanczos': eigenpairs kept", 20)
    fisher: str = help_field("solver='ekfac': sampled | empirical", "sampled")
    max_iter: int = help_field("CG / MINRES iteration cap", 100)
    tol: float = help_field("CG / MINRES relative residual tolerance", 1e-6)
    hvp_batches: Optional[int] = help_field(
        "training batches used for HVPs (seeded subsample; None: all)"
    )
    hvp_mode: str = help_field("rev-rev | fwd-rev | double-backward", "double-backward")
    cache_graphs: bool = help_field("double-backward: reuse each batch's first-order graph", True)
    on_negative_curvature: str = help_field("raise | stop", "stop")
    fidelity_samples: int = help_field(
        "parameters zeroed one at a time for the fidelity check", 500
    )
    fidelity_dtype: str = help_field("float64 | float32 for the fidelity evaluation", "float64")
    heldout: bool = help_field(
        "also run the held-out protocol: a seeded two-fold split of dev; validation "
        "gradient, scores and best k from one half, accuracy on the other (both ways)",
        False,
    )
    split_seed: int = help_field("seed of the two-fold dev split", 0)
    split_seeds: Sequence[int] = help_field(
        "held-out: further split seeds (repeated cross-fitting): each its own fold scores "
        "and sweeps, in splits/seedN/ (the random-k control and group fidelity stay on the "
        "main split); their spread is reported beside the main split's",
        default_factory=list,
    )
    random_draws: int = help_field(
        "held-out: draws of the random-k control (k random analysed parameters; 0: none)", 0
    )
    fresh_rows: int = help_field(
        "fresh test set: SST-2 training rows the checkpoint was not fine-tuned on, drawn "
        "seeded; every choice (scores, k, offsets) is made on dev and measured there once "
        "(0: none)",
        0,
    )
    fresh_seed: int = help_field("seed of the fresh test rows' draw", 0)
    group_subsets: int = help_field(
        "held-out: random subsets per k for group fidelity (0: no group fidelity)", 0
    )
    group_ks: Sequence[int] = help_field(
        "group fidelity: subset sizes", default_factory=lambda: list(DEFAULT_GROUP_KS)
    )
    group_flagged: int = help_field("group fidelity: random k-subsets of each flagged set", 10)
    group_quadratic: int = help_field(
        "group fidelity: random subsets per k that also get the second-order group term "
        "½ θ_Sᵀ H θ_S (one validation Hessian-vector product each)",
        0,
    )
    spectrum_steps: int = help_field(
        "Lanczos steps of the training-loss curvature spectrum (λ_min, λ_max, trace, "
        "density) per curvature the influence methods use, on their HVP batches (0: none)",
        0,
    )
    spectrum_probes: int = help_field("spectrum: Lanczos runs for the density (30 steps each)", 3)
    location_ks: Sequence[int] = help_field(
        "top-k sets whose layers and module kinds are counted (with the flagged set)",
        default_factory=lambda: list(DEFAULT_LOCATION_KS),
    )
    progress: bool = help_field("show progress bars", True)

    def validate(self) -> None:
        for m in self.methods:
            parse_method(m)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        if not self.methods:
            raise ValueError("no methods given")
        masking.check_ks(list(self.ks))
        if self.fidelity_samples < 0:
            raise ValueError("fidelity_samples must be >= 0")
        if self.fidelity_dtype not in ("float64", "float32"):
            raise ValueError("fidelity_dtype must be float64 or float32")
        if self.spectrum_steps == 1 or self.spectrum_steps < 0 or self.spectrum_probes < 1:
            raise ValueError(
                f"spectrum_steps must be 0 (none) or >= 2 and spectrum_probes >= 1, got "
                f"{self.spectrum_steps} and {self.spectrum_probes}"
            )
        for name in ("random_draws", "group_subsets", "group_flagged", "group_quadratic",
                     "fresh_rows"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(set(self.split_seeds)) != len(self.split_seeds) or self.split_seed in set(
            self.split_seeds
        ):
            raise ValueError(
                f"split_seeds must be distinct and differ from split_seed ({self.split_seed}), "
                f"got {list(self.split_seeds)}"
            )
        if not self.heldout:
            used = [n for n in ("random_draws", "group_subsets", "split_seeds") if getattr(self, n)]
            if used:
                raise ValueError(f"{', '.join(used)} need the held-out protocol (heldout=True)")
        masking.check_ks(list(self.group_ks))
        masking.check_ks(list(self.location_ks))
        for m in self.methods:  # the scoring settings, before any work
            self.score_config(m).validate()

    def score_config(self, label: str, out: Optional[Path] = None) -> ScoreConfig:
        """The scoring settings of method `label`; with `out` (the checkpoint's output
        directory) solver='lanczos' keeps its eigenpairs there (lowrank-<label>.safetensors),
        so a rerun with another validation set or damping costs no curvature product."""
        v = parse_method(label)
        solver = v.solver or self.solver
        if v.max_iter is not None and solver not in ITERATIVE_SOLVERS:
            raise ValueError(
                f"{label!r}: it{v.max_iter} caps an iterative solve "
                f"({', '.join(ITERATIVE_SOLVERS)}), not solver {solver!r}"
            )
        if v.rank is not None and solver != "lanczos":
            raise ValueError(
                f"{label!r}: r{v.rank} is the rank of solver 'lanczos', not {solver!r}"
            )
        rank = v.rank or self.rank
        lowrank = None
        if out is not None and solver == "lanczos" and v.method == "influence":
            lowrank = str(Path(out) / f"lowrank-{label}.safetensors")
        return ScoreConfig(
            method=v.method, solver=solver, curvature=v.curvature or self.curvature,
            damping=v.damping or self.damping, rank=rank, fisher=self.fisher, lowrank_file=lowrank,
            max_iter=v.max_iter or self.max_iter, tol=self.tol, lr=self.lr, hvp_mode=self.hvp_mode,
            cache_graphs=self.cache_graphs and self.hvp_mode == "double-backward",
            hvp_batches=self.hvp_batches, on_negative_curvature=self.on_negative_curvature,
            progress=self.progress,
            **({"lanczos_steps": lanczos_steps(rank)} if solver == "lanczos" else {}),
        )  # fmt: skip


#: Solvers whose iteration count a label's ``it<N>`` token may cap.
ITERATIVE_SOLVERS = ("minres", "cg")


def lanczos_steps(rank: int) -> int:
    """The Lanczos step cap for a low-rank inverse of `rank` pairs: 60 (the library's
    default, 3 × the default rank 20), or 1.5 × rank for larger ranks."""
    return max(60, (3 * rank + 1) // 2)


@dataclass(frozen=True)
class Variant:
    """What a method label names: the method and the settings it overrides (None: the run's)."""

    method: str
    curvature: Optional[str] = None
    solver: Optional[str] = None
    damping: Optional[str] = None
    max_iter: Optional[int] = None
    rank: Optional[int] = None


#: Label tokens after the method: curvatures, solvers and 'auto' (damping='auto').
def _label_tokens() -> Dict[str, Tuple[str, str]]:
    tokens = {c: ("curvature", c) for c in CURVATURES}
    tokens.update({s: ("solver", s) for s in SOLVERS})
    tokens["auto"] = ("damping", "auto")
    return tokens


_COUNT_TOKENS = {"it": "max_iter", "r": "rank"}


def count_token(tok: str) -> Optional[Tuple[str, int]]:
    """``it<N>`` -> ("max_iter", N), ``r<N>`` -> ("rank", N) (N >= 1, no leading zero)."""
    m = re.fullmatch(r"(it|r)([1-9][0-9]*)", tok)
    return None if m is None else (_COUNT_TOKENS[m.group(1)], int(m.group(2)))


def parse_method(label: str) -> Variant:
    """A method label: the method, then optional tokens that override the run's settings
    for that method only, in any order, each kind at most once:

    - a curvature (``hessian``, ``ggn``),
    - a solver (``minres``, ``cg``, ``lissa``, ``explicit``, ``lanczos``, ``ekfac``),
    - ``auto``: damping="auto",
    - ``it<N>``: at most N iterations (solver ``minres`` or ``cg``),
    - ``r<N>``: rank N (solver ``lanczos``; its step cap grows with it, `lanczos_steps`).

    'influence' -> Variant('influence'); 'influence-ggn-cg' -> the GGN solved by CG;
    'influence-cg-auto' -> auto-damped CG on the Hessian; 'influence-minres-it200' ->
    MINRES capped at 200 iterations. So one analysis compares second-order variants
    side by side (and one solver at several truncations). Tokens other than a curvature
    apply to ``influence`` only (the other methods have no solve).
    """
    method, *rest = label.split("-")
    if method not in METHODS:
        raise ValueError(
            f"unknown method {label!r}; one of {sorted(METHODS)}, optionally followed by "
            "-<curvature>, -<solver>, -auto, -it<N>, -r<N>"
        )
    tokens = _label_tokens()
    found: Dict[str, Union[str, int]] = {}
    for tok in rest:
        count = count_token(tok)
        if tok not in tokens and count is None:
            raise ValueError(
                f"unknown variant {tok!r} in {label!r}; one of {sorted(tokens)}, it<N> or r<N>"
            )
        kind, value = tokens[tok] if count is None else count
        if kind in found:
            raise ValueError(f"{label!r} names the {kind} twice ({found[kind]!r}, {value!r})")
        if kind != "curvature" and method != "influence":
            raise ValueError(f"{label!r}: only influence takes a {kind} ({tok!r})")
        found[kind] = value
    return Variant(method, **found)
