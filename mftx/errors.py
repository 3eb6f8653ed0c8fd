"""Exceptions raised by mftx, each naming the cause and what to do about it."""

from __future__ import annotations


class NonFiniteError(FloatingPointError, ValueError):
    """A loss, gradient or Hessian-vector product holds NaN or inf."""


class NegativeCurvatureError(ArithmeticError):
    """CG met pᵀ(H + λI)p <= 0: the damped Hessian is not positive definite."""

    def __init__(self, iteration: int, curvature: float, damping: float, no_iterate: bool = False):
        self.iteration = iteration
        self.curvature = curvature
        self.damping = damping
        self.no_iterate = no_iterate
        msg = (
            f"CG met non-positive curvature pᵀ(H+λI)p = {curvature:.3e} at iteration "
            f"{iteration} (damping λ = {damping:g}): H + λI is not positive definite here. "
        )
        if no_iterate:
            msg += (
                "It happened on the first step, so there is no iterate to keep (every score "
                "would be zero). Raise the damping or use curvature='ggn' (positive "
                "semi-definite)."
            )
        else:
            msg += (
                "Raise the damping, use curvature='ggn' (positive semi-definite), or pass "
                "on_negative_curvature='stop' to keep the iterate reached so far."
            )
        super().__init__(msg)


class SolverDivergedError(ArithmeticError):
    """An iterative solver's iterate grew without bound or became non-finite."""


class MftxWarning(UserWarning):
    """Base class of mftx's warnings: ``warnings.filterwarnings("ignore", category=mftx.MftxWarning)``
    silences them all, ``"error"`` turns them into exceptions."""


class ConvergenceWarning(MftxWarning):
    """An iterative solve stopped without meeting its tolerance: the scores come from a
    partial iterate, not from the formula's solution. The message names the solver, the
    iterations, the relative residual reached and what to try."""


class ConvergenceError(ArithmeticError):
    """``strict=True``: an iterative solve stopped without meeting its tolerance (the
    same message as `ConvergenceWarning`, raised instead of returning the partial iterate)."""
