"""`Scores`: one score per analysed parameter, and which parameters to remove first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import fileio, ops
from .ops import Candidates

__all__ = ["METHODS", "Scores", "describe"]

#: For each method: the data it uses (training and/or validation batches), whether
#: candidates are the largest scores (else the smallest), and its flag rule (threshold,
#: below) or None. The sign convention lives here only.
METHODS: Dict[str, Dict[str, Any]] = {
    "gradient": {
        "uses": ("train",),
        "largest": True,
        "flag": (0.0, False),
        "flag_label": "detrimental",
        "help": "|θ| − |θ − lr·g_train|: how far one SGD step moves θ toward zero; > 0 flagged",
    },
    "influence": {
        "uses": ("train", "val"),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−θ ⊙ (H + λI)⁻¹ ∇L_val: predicted change of validation loss; < 0 flagged",
    },
    "taylor": {
        "uses": ("val",),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−g_val ⊙ θ: first-order change of validation loss when zeroing; < 0 flagged",
    },
    "obd": {
        "uses": ("val",),
        "largest": False,
        "flag": (0.0, True),
        "flag_label": "beneficial",
        "help": "−g_val ⊙ θ + ½ diag(H_val) ⊙ θ²: second-order change of validation loss; < 0 flagged",
    },
    "magnitude": {
        "uses": (),
        "largest": False,
        "flag": None,
        "flag_label": None,
        "help": "|θ|: smallest first; ranks only, flags nothing",
    },
}

_FORMAT = "mftx.scores/1"

_SOLVER_NAMES = {"cg": "CG", "minres": "MINRES", "lissa": "LiSSA", "explicit": "a dense solve"}
_CURVATURE_SYMBOL = {"hessian": "H", "ggn": "G"}


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def describe(method: str, config: Dict[str, Any], stats: Dict[str, Any]) -> str:
    """One line saying what a scoring run computed and how well, from its config and stats.

    For an influence solve: the solver, the system (curvature and λ), iterations,
    the relative residual reached, whether it met the tolerance, curvature products
    and seconds; "NOT converged" where the scores come from a partial iterate. The
    same line is logged by `mftx analyze`, printed by the CLI and shown by the report.
    """
    secs = stats.get("seconds")
    tail = f"; {secs:.1f} s" if isinstance(secs, (int, float)) else ""
    if method == "gradient":
        lr = config.get("lr")
        what = "gradient rule |θ − lr·g| < |θ|" + (f" (lr {lr:g})" if isinstance(lr, float) else "")
        if stats.get("flagged") is not None:
            what += f", {stats['flagged']:,} flagged detrimental"
        return what + tail
    if method == "taylor":
        return "taylor −∇L_val ⊙ θ (first order)" + tail
    if method == "magnitude":
        return "magnitude |θ|" + tail
    if method == "obd":
        probes = stats.get("probes", config.get("probes"))
        diag = (
            "exact diag(H_val)" if probes == 0 else f"diag(H_val) from {probes} Hutchinson probes"
        )
        return (
            f"obd −∇L_val ⊙ θ + ½ diag(H_val) ⊙ θ² ({diag}, {stats.get('n_hvp', 0)} products)"
            + tail
        )
    solver = stats.get("solver") or {}
    name = solver.get("solver", config.get("solver"))
    lam = stats.get("damping", config.get("damping"))
    lam_text = _num(lam) if isinstance(lam, (int, float)) else str(lam)
    products = stats.get("n_hvp", solver.get("n_matvec"))
    if name == "ekfac":
        ek = stats.get("ekfac") or {}
        fisher = ek.get("fisher", config.get("fisher", "sampled"))
        mods = ek.get("modules")
        where = f" over {mods} linear modules" if mods is not None else ""
        return (
            f"influence: EK-FAC of the {fisher} Fisher{where}, λ = {lam_text}, closed form "
            "(no curvature products)" + tail
        )
    sym = _CURVATURE_SYMBOL.get(config.get("curvature", "hessian"), "C")
    rel = solver.get("relative_residual")
    if name == "lanczos":
        low = stats.get("lowrank") or {}
        rank = low.get("rank", config.get("rank"))
        text = (
            f"influence: rank-{rank} Lanczos inverse of {sym} (λ = {lam_text}), "
            f"{100 * rel:.0f} % of ∇L_val outside the eigenvectors' span"
            if isinstance(rel, (int, float))
            else f"influence: rank-{rank} Lanczos inverse of {sym} (λ = {lam_text})"
        )
        if solver.get("converged") is False:
            text += ", eigenpairs NOT converged"
        return text + f"; {products or 0} products" + tail
    label = _SOLVER_NAMES.get(name, str(name))
    text = f"influence: {label} on ({sym} + {lam_text} I), {solver.get('iterations', 0)} it., rel. residual {_num(rel)}"
    if solver.get("converged") is False or not meets_tolerance(config, solver):
        text += f" — NOT converged (tol {_num(config.get('tol'))}; {solver.get('reason', '')})"
    elif solver:
        text += " (converged)"
    return text + f"; {products or 0} products" + tail


def meets_tolerance(config: Dict[str, Any], solver: Dict[str, Any]) -> bool:
    """Whether a solve did what its name says: the solver's own verdict (tolerance met;
    for Lanczos, eigenpairs converged), and for fixed-iteration CG, which has no stopping
    test, a final relative residual within ``tol``. ``tol=0`` asks CG / MINRES for exactly
    ``max_iter`` iterations (met unless CG hit non-positive curvature). True where there
    was no solve."""
    if not solver:
        return True
    tol = config.get("tol")
    if (
        solver.get("solver") in ("cg", "minres")
        and tol == 0
        and not solver.get("negative_curvature")
    ):
        return True  # tol=0 asks for max_iter iterations, no stopping test: done as asked
    if solver.get("converged") is False:
        return False
    rel, tol = solver.get("relative_residual"), config.get("tol")
    if solver.get("solver") == "cg" and config.get("fixed_iterations") and isinstance(tol, float):
        return rel is None or tol <= 0 or rel <= tol
    return True


class Scores:
    """Per-parameter scores of one method, keyed by parameter name.

    `candidates(k)` gives the k parameters most worth removing, first first;
    `flagged()` the method's flagged set (gradient: detrimental; influence,
    taylor, obd: beneficial to remove), both as `Candidates` whose tensor
    indices follow `names`.
    """

    def __init__(
        self,
        method: str,
        scores: Dict[str, torch.Tensor],
        config: Optional[Dict[str, Any]] = None,
        stats: Optional[Dict[str, Any]] = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
        if not scores:
            raise ValueError("Scores needs at least one score tensor")
        self.method = method
        self.scores = dict(scores)
        self.config = dict(config or {})
        self.stats = dict(stats or {})
        self._fused_flagged: Optional[Candidates] = None

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.scores)

    def tensors(self) -> List[torch.Tensor]:
        return list(self.scores.values())

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.scores.values())

    def __repr__(self) -> str:
        return f"Scores({self.method!r}, {self.numel:,} parameters: {self.summary()})"

    def summary(self) -> str:
        """What was computed, in one line: method, solver, curvature, λ, iterations,
        relative residual, converged or not, curvature products, seconds (`describe`)."""
        return describe(self.method, self.config, self.stats)

    @property
    def converged(self) -> Optional[bool]:
        """For an iterative influence solve, whether it met its tolerance; None where
        there was no iterative solve (first-order methods, EK-FAC's closed form)."""
        solver = self.stats.get("solver")
        if not solver or solver.get("solver") in ("ekfac",):
            return None
        return meets_tolerance(self.config, solver)

    def candidates(self, k: int) -> Candidates:
        """The k parameters most worth removing, most first."""
        return ops.topk(self.tensors(), k, largest=METHODS[self.method]["largest"])

    def flagged(self) -> Candidates:
        """The method's flagged set, most extreme first."""
        rule = METHODS[self.method]["flag"]
        if rule is None:
            raise ValueError(
                f"method {self.method!r} ranks parameters but flags none; use candidates(k)"
            )
        if self._fused_flagged is not None:
            return self._fused_flagged
        threshold, below = rule
        return ops.select(self.tensors(), threshold, below=below)

    def locate(self, cands: Candidates) -> List[Tuple[str, Tuple[int, ...], float]]:
        """(parameter name, multi-index, score) of each candidate."""
        names = self.names
        out = []
        for t, f, v in cands:
            shape = self.scores[names[t]].shape
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(f), shape))
            out.append((names[t], idx, v))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        """Write a safetensors file; method, config and stats go in its JSON metadata."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "names": list(self.names),
            "config": self.config,
            "stats": self.stats,
        }
        tensors = {
            f"score.{i}": t.detach().contiguous().cpu() for i, t in enumerate(self.tensors())
        }
        return fileio.write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Union[str, Path]) -> Scores:
        path = Path(path)
        tensors, meta = fileio.read_safetensors(path, _FORMAT, "scores")
        keys = [f"score.{i}" for i in range(len(meta.get("names", ())))]
        if "names" not in meta or set(keys) != set(tensors):
            raise fileio.FileFormatError(path, "mftx scores whose tensors do not match 'names'")
        scores = {n: tensors[k] for n, k in zip(meta["names"], keys)}
        return cls(meta["method"], scores, meta["config"], meta["stats"])


def from_space(method: str, names: Sequence[str], tensors: Sequence[torch.Tensor], **kw) -> Scores:
    return Scores(method, dict(zip(names, tensors)), **kw)
