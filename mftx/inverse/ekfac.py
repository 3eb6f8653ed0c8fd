"""``solver="ekfac"``: the eigenvalue-corrected Kronecker-factored Fisher (George et al. 2018).

No curvature-vector products: the Fisher F of the training loss is approximated
block-diagonally, one block per linear module of the analysed space — `nn.Linear`,
and the ``Conv1D`` of GPT-2-style models (``y = x W + b`` with W stored as
(in, out): the transpose of a Linear weight) — weight and bias together (the
bias is an extra input column of ones), and each block is inverted in closed form. For a module with per-token inputs a (with
the ones column: ā) and per-token gradients δ of the per-example loss with
respect to its outputs:

- A = mean over tokens of ā āᵀ, S = mean over tokens of δ δᵀ (K-FAC's factors;
  tokens whose ``attention_mask`` is 0 are left out of A, their δ is zero
  anyway), with eigenbases Q_A, Q_S;
- the per-example gradient of the block is G_n = Σ_t δ_t ā_tᵀ (tokens summed
  within an example, as kronfluence does for sequence models), and the
  corrected eigenvalues are Λ = mean over examples of (Q_Sᵀ G_n Q_A)² (entrywise);
- F_block ≈ (Q_A ⊗ Q_S) diag(vec Λ) (Q_A ⊗ Q_S)ᵀ, so
  (F_block + λI)⁻¹ v = Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ for the block V of v.

Λ is exactly the diagonal of the block's Fisher in the Kronecker eigenbasis, so
the approximation is exact wherever the Fisher block is a Kronecker product with
those eigenvectors (for example one token per example and the same input for
all). The Fisher uses labels sampled from the model's predictive distribution
(``fisher="sampled"``, seeded; the true Fisher, which equals the GGN of the
cross-entropy in expectation) or the training labels (``"empirical"``). The
scale matches `mftx.Curvature`: the mean over examples of the per-example
Fisher, the loss being a mean over the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import dist
from ..core.objective import Objective, batch_size
from ..core.params import ParamSpace

__all__ = ["EKFAC", "FISHERS", "fit", "linear_blocks", "sampled_batches"]

FISHERS = ("sampled", "empirical")


@dataclass
class Block:
    """One linear module's share of the analysed space, and its factors once fitted."""

    module: str
    weight: Optional[int]  # index of the weight tensor in the space (None: not analysed)
    bias: Optional[int]
    d_out: int
    d_in: int  # input features (without the ones column)
    transposed: bool = False  # weight stored (d_in, d_out), as GPT-2's Conv1D
    QA: Optional[torch.Tensor] = None  # (k, k) float64, k = columns of ā
    QS: Optional[torch.Tensor] = None  # (d_out, d_out) float64
    lam: Optional[torch.Tensor] = None  # (d_out, k) float64

    @property
    def k(self) -> int:
        return (self.d_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)


def _linear_shape(mod: nn.Module) -> Optional[Tuple[int, int, bool]]:
    """(d_out, d_in, transposed) of a linear module, None for anything else.

    `nn.Linear` (weight (out, in)) and the ``Conv1D`` of Hugging Face's GPT-2 family
    (weight (in, out), ``y = x W + b``; recognised by its class name and its ``nf``
    attribute so that transformers need not be imported)."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features, False
    w = getattr(mod, "weight", None)
    if (
        type(mod).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and getattr(mod, "nf", None) == w.shape[1]
    ):
        return w.shape[1], w.shape[0], True
    return None


def linear_blocks(model: nn.Module, space: ParamSpace) -> List[Block]:
    """The linear modules (`nn.Linear`, GPT-2's ``Conv1D``) holding the analysed
    parameters; refuses anything else, naming the parameters."""
    where = {id(p): i for i, p in enumerate(space.params)}
    blocks, covered = [], {}
    for name, mod in model.named_modules():
        shape = _linear_shape(mod)
        if shape is None:
            continue
        w = where.get(id(mod.weight))
        b = where.get(id(mod.bias)) if mod.bias is not None else None
        if w is None and b is None:
            continue
        for i in (w, b):
            if i is not None and i in covered:
                raise ValueError(
                    f"solver='ekfac': {space.names[i]} is used by two linear modules "
                    f"({covered[i]} and {name}); tied weights are not supported"
                )
            if i is not None:
                covered[i] = name
        blocks.append(Block(name, w, b, *shape))
    outside = [n for i, n in enumerate(space.names) if i not in covered]
    if outside:
        raise ValueError(
            "solver='ekfac' covers the weights and biases of linear modules only (nn.Linear, "
            "GPT-2's Conv1D); these "
            f"analysed parameters are not: {outside[:8]}{' ...' if len(outside) > 8 else ''}. "
            "Exclude them (select_params(exclude=...)) or use another solver."
        )
    return blocks


def _check_sampling(objective: Any) -> None:
    if not isinstance(objective, Objective):
        raise TypeError(
            "fisher='sampled' needs the outputs: pass loss_fn=mftx.Objective(outputs, loss) "
            "(the default HF objective has it), or use fisher='empirical'"
        )


def _draw(z: torch.Tensor, batch: Any, seed: int, pos: int, i: int) -> Any:
    """`batch` with ``labels`` drawn from the logits `z` (examples numbered from `pos`)."""
    if z.dim() != 2 or z.shape[1] < 2 or not isinstance(batch.get("labels"), torch.Tensor):
        raise ValueError(
            f"fisher='sampled' samples class labels from logits (batch, classes >= 2); "
            f"batch {i} gives outputs of shape {tuple(z.shape)}. Use fisher='empirical'."
        )
    probs = torch.softmax(z.detach().to(torch.float64).cpu(), dim=1)
    u = dist.uniforms(seed, pos, probs.shape[0])
    y = (u[:, None] >= torch.cumsum(probs, 1)).sum(1).clamp(max=probs.shape[1] - 1)
    return {**batch, "labels": y.to(batch["labels"].device, batch["labels"].dtype)}


def sampled_batches(
    model: nn.Module, batches: Sequence[Any], objective: Objective, seed: int, offset: int = 0
) -> List[Any]:
    """The batches with ``labels`` drawn from the model's predictive distribution (seeded).

    The outputs are read as logits of a categorical distribution: (batch, classes).
    Example j (counted over the batches from `offset`, its global index in a
    data-parallel union) gets the class at which the cumulative probabilities
    pass a uniform keyed by (`seed`, j) (`mftx.core.dist.uniforms`): the same
    labels however the examples are split over ranks or batched. (`fit` draws the
    same labels inside its first pass, without a forward pass of its own.)
    """
    _check_sampling(objective)
    out = []
    pos = offset
    with torch.no_grad():
        for i, b in enumerate(batches):
            out.append(_draw(objective.outputs(model, b), b, seed, pos, i))
            pos += batch_size(b)
    return out


class _Capture:
    """Forward hooks that keep each block's inputs and outputs during one forward."""

    def __init__(self, model: nn.Module, blocks: List[Block]):
        mods = dict(model.named_modules())
        self.inputs: Dict[str, List[torch.Tensor]] = {b.module: [] for b in blocks}
        self.outputs: Dict[str, List[torch.Tensor]] = {b.module: [] for b in blocks}
        self.handles = [mods[b.module].register_forward_hook(self._hook(b.module)) for b in blocks]

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            self.inputs[name].append(inputs[0].detach())
            self.outputs[name].append(output)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _per_token(model, blocks, loss_fn, batch, relabel=None):
    """For each block: ā (B, T, k), its token weights (B, T), δ (B, T, d_out); and the
    batch the loss was taken on. `relabel` (outputs -> batch): labels drawn from this
    forward pass's own outputs (the sampled Fisher's first pass; no second forward)."""
    n = batch_size(batch)
    cap = _Capture(model, blocks)
    try:
        with torch.enable_grad():
            if relabel is None:
                loss = loss_fn(model, batch) * n  # the sum of per-example losses
            else:
                z = loss_fn.outputs(model, batch)
                batch = relabel(z)
                loss = loss_fn.loss(z, batch) * n
            outs = [o for b in blocks for o in cap.outputs[b.module]]
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
    finally:
        cap.close()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    res, j = [], 0
    for blk in blocks:
        acts, deltas = [], []
        for a, o in zip(cap.inputs[blk.module], cap.outputs[blk.module]):
            g = grads[j]
            j += 1
            if a.shape[0] != n:
                raise ValueError(
                    f"solver='ekfac': the input of {blk.module} has leading dimension "
                    f"{a.shape[0]}, the batch {n} examples (batch-first inputs are needed)"
                )
            acts.append(a.reshape(n, -1, blk.d_in))
            deltas.append((torch.zeros_like(o) if g is None else g).reshape(n, -1, blk.d_out))
        a = torch.cat(acts, 1)
        cols = ([a] if blk.weight is not None else []) + (
            [torch.ones_like(a[..., :1])] if blk.bias is not None else []
        )
        a_bar = torch.cat(cols, -1)
        w = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == w.shape:
            w = mask.to(a.dtype)
        res.append((a_bar, w, torch.cat(deltas, 1)))
    return res, batch


class EKFAC:
    """A fitted EK-FAC of the Fisher over a parameter space; `solve` inverts it."""

    def __init__(self, blocks: List[Block], numels: Sequence[int], info: Dict[str, Any]):
        self.blocks = blocks
        self.numels = list(numels)
        self.info = info

    def eigenvalues(self) -> torch.Tensor:
        """All corrected eigenvalues Λ (the exact spectrum of the approximation)."""
        return torch.cat([b.lam.reshape(-1) for b in self.blocks])

    def _apply(self, v: torch.Tensor, scale: Callable[[torch.Tensor], torch.Tensor]):
        parts = list(torch.split(v, self.numels))
        out = torch.zeros_like(v)
        outs = list(torch.split(out, self.numels))
        for b in self.blocks:
            cols = []
            if b.weight is not None:
                W = parts[b.weight]
                cols.append(
                    W.reshape(b.d_in, b.d_out).T if b.transposed else W.reshape(b.d_out, b.d_in)
                )
            if b.bias is not None:
                cols.append(parts[b.bias].reshape(b.d_out, 1))
            V = torch.cat(cols, 1).to(torch.float64)
            QS, QA = b.QS.to(v.device), b.QA.to(v.device)
            R = QS @ ((QS.T @ V @ QA) * scale(b.lam.to(v.device))) @ QA.T
            R = R.to(v.dtype)
            if b.weight is not None:
                RW = R[:, : b.d_in]
                outs[b.weight].copy_((RW.T if b.transposed else RW).reshape(-1))
            if b.bias is not None:
                outs[b.bias].copy_(R[:, -1])
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """F_ekfac v."""
        return self._apply(v, lambda lam: lam)

    def solve(self, g: torch.Tensor, damping: float) -> torch.Tensor:
        """(F_ekfac + λI)⁻¹ g."""
        if damping <= 0 and bool((self.eigenvalues() <= 0).any()):
            raise ValueError(
                "EK-FAC has zero eigenvalues (directions no training gradient reaches): "
                "it needs damping > 0"
            )
        return self._apply(g, lambda lam: 1.0 / (lam + damping))


def _eigenbasis(factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The eigenvectors (float64) of a float64 factor, decomposed in `dtype` (factors under
    256 rows always in float64). float32 takes about half the time, but its eigenvectors of
    the small eigenvalues are rounded at 1e-7 of the largest: the corrected Λ measured in
    that basis differ, and at small damping the preconditioned gradient moves by percents
    (2.3e-2 on all-MiniLM-L6-v2 at kronfluence's 0.1 × mean Λ, benchmarks/bench_peers.py)."""
    if dtype == torch.float64 or factor.shape[0] < 256:
        return torch.linalg.eigh(factor)[1]
    scale = factor.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.linalg.eigh((factor / scale).to(torch.float32))[1].to(torch.float64)


def fit(
    model: nn.Module,
    space: ParamSpace,
    batches: Sequence[Any],
    loss_fn: Callable,
    fisher: str = "sampled",
    seed: int = 0,
    progress: bool = False,
    distributed: Optional[bool] = None,
    eigh_dtype: torch.dtype = torch.float64,
) -> EKFAC:
    """Fit EK-FAC over `batches`: one pass for A and S, one for the corrected eigenvalues.

    `distributed` (None: when torch.distributed is initialised): `batches` is this
    rank's shard; the factors, corrected eigenvalues and example count are summed
    over ranks and sampled labels keyed by global example index, so every rank
    gets the fit of one process on the union of the shards. `eigh_dtype`: the precision
    of the factors' eigendecompositions (float32: about half the time, a different
    eigenbasis for the small eigenvalues; see `_eigenbasis`).
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    t0 = time.perf_counter()
    on = dist.active(distributed)
    blocks = linear_blocks(model, space)
    batches = list(batches)
    pos = None
    if fisher == "sampled":  # labels drawn from the first pass's own forward
        _check_sampling(loss_fn)
        pos = dist.example_offset(sum(batch_size(b) for b in batches), on)
    f64 = torch.float64
    A = [torch.zeros(b.k, b.k, dtype=f64) for b in blocks]
    S = [torch.zeros(b.d_out, b.d_out, dtype=f64) for b in blocks]
    for j, batch in enumerate(tqdm(batches, desc="ekfac factors", disable=not progress,
                                   leave=False)):  # fmt: skip
        relabel = None
        if pos is not None:
            relabel = lambda z, b=batch, p=pos, j=j: _draw(z, b, seed, p, j)  # noqa: E731
            pos += batch_size(batch)
        per_token, batches[j] = _per_token(model, blocks, loss_fn, batch, relabel)
        for i, (a, w, d) in enumerate(per_token):
            aw = a * w[..., None]
            A[i] += (aw.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1])).to(f64).cpu()
            d2 = d.reshape(-1, d.shape[-1])
            S[i] += (d2.T @ d2).to(f64).cpu()
    _sum_over_ranks(A + S, on)
    for i, b in enumerate(blocks):  # eigenbases are scale-free: no normalisation needed
        b.QA = _eigenbasis(A[i], eigh_dtype)
        b.QS = _eigenbasis(S[i], eigh_dtype)
        A[i] = S[i] = None  # factors freed as their eigenbases arrive (half the peak)
        b.lam = torch.zeros(b.d_out, b.k, dtype=f64)
    n_all = 0
    for batch in tqdm(batches, desc="ekfac eigenvalues", disable=not progress, leave=False):
        n_all += batch_size(batch)
        for b, (a, _, d) in zip(blocks, _per_token(model, blocks, loss_fn, batch)[0]):
            QA, QS = b.QA.to(a.device, a.dtype), b.QS.to(d.device, d.dtype)
            rotated = torch.einsum("bto,bti->boi", d @ QS, a @ QA)  # Q_Sᵀ G_n Q_A per example
            b.lam += (rotated * rotated).sum(0).to(f64).cpu()
    _sum_over_ranks([b.lam for b in blocks], on)
    n_all, n_batches = (int(sum(dist.counts(x, on))) for x in (n_all, len(batches)))
    for b in blocks:
        b.lam /= n_all
    info = {
        "fisher": fisher, "seed": seed, "modules": len(blocks), "batches": n_batches,
        "examples": n_all, "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    return EKFAC(blocks, space.numels, info)


def _sum_over_ranks(tensors: List[torch.Tensor], on: bool) -> None:
    """Each tensor summed over ranks in place (one collective for all of them)."""
    if not on or not tensors:
        return
    flat = dist.all_sum(torch.cat([t.reshape(-1) for t in tensors]))
    for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(part.view_as(t))
