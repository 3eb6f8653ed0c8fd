"""Scoring a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each rank holds the rows of every analysed parameter that FSDP2 gave it
(``Shard(0)``: `torch.chunk` of dim 0) and gets the scores of those rows only:

- ``magnitude``: |θ| of the shard;
- ``gradient`` and ``taylor``: the training / validation gradient through
  FSDP2's own backward (its reduce-scatter sums the ranks' data: each rank
  passes its batches, as in the data-parallel `mftx.score`), then the rule on
  the shard;
- ``influence`` with ``solver="ekfac"``: the Kronecker factors (d_in² and
  d_out² per Linear module, from activations, which FSDP2 does not shard) are
  summed over ranks and kept on every rank; the corrected eigenvalues Λ are
  kept by row chunks like the parameters; the solve takes one module at a time
  (one module's worth of temporaries).

Every other method needs curvature-vector products, which torch cannot take
through FSDP2: ``torch.autograd.grad`` does not reach the sharded parameters
(each forward all-gathers them into unsharded tensors, and gradients come back
to the shards only through ``.backward()``). Those are refused by name.

`ShardedScores.candidates(k)` is the single-process top-k over the sharded
scores without gathering them (each rank's `mftx.ops.topk`, then a merge of k
candidates per rank on the exact score values, ties by (tensor, flat index) as
the op breaks them); `ShardedMask` zeroes and restores candidates on the shards.

All of it is collective: every rank calls it with its own batches (at least
one each), in the same order.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from . import ops
from .core import dist
from .core.objective import batch_size
from .core.params import ParamSpace
from .errors import NonFiniteError
from .inverse import ekfac
from .ops import Candidates
from .scores import METHODS, Scores

__all__ = ["ShardedMask", "ShardedScores", "ShardedSpace", "is_sharded", "score"]

SUPPORTED = ("gradient", "taylor", "magnitude", "influence with solver='ekfac'")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of `params` is a DTensor (a parameter sharded by FSDP2)."""
    dt = _dtensor_type()
    return dt is not None and any(isinstance(p, dt) for p in params)


class ShardedSpace:
    """The analysed parameters' shards on this rank: for each, its local rows.

    ``local[i]`` is the live local tensor (writes show in the model), ``shapes[i]``
    the full shape, ``rows[i]`` the [start, stop) rows held here and ``offsets[i]``
    the flat (row-major) index of the first local entry in the full tensor.
    """

    def __init__(self, space: ParamSpace):
        dt = _dtensor_type()
        self.names = space.names
        self.params = space.params
        self.rank, self.world = dist.rank_world()
        self.local: List[torch.Tensor] = []
        self.shapes: List[torch.Size] = []
        self.rows: List[Tuple[int, int]] = []
        self.offsets: List[int] = []
        for name, p in space:
            if not isinstance(p, dt):
                raise ValueError(
                    f"{name} is not sharded: mftx's sharded path needs every analysed parameter "
                    "sharded by fully_shard (or none, for the data-parallel path)"
                )
            from torch.distributed.tensor import Shard

            if len(p.placements) != 1 or p.placements[0] != Shard(0):
                raise ValueError(
                    f"{name} is sharded as {p.placements}; mftx reads FSDP2's one-dimensional "
                    "Shard(0) layout only"
                )
            local = p.to_local().detach()
            d = p.shape[0] if p.dim() else 1
            chunk = math.ceil(d / self.world)
            start, stop = min(self.rank * chunk, d), min((self.rank + 1) * chunk, d)
            if local.shape[0] != stop - start or tuple(local.shape[1:]) != tuple(p.shape[1:]):
                raise ValueError(
                    f"{name}: local shard {tuple(local.shape)} is not torch.chunk's rows "
                    f"[{start}, {stop}) of {tuple(p.shape)}"
                )
            row = math.prod(p.shape[1:])
            self.local.append(local)
            self.shapes.append(p.shape)
            self.rows.append((start, stop))
            self.offsets.append(start * row)

    @property
    def local_numel(self) -> int:
        return sum(t.numel() for t in self.local)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def to_local(self, cands: Candidates) -> Tuple[Candidates, torch.Tensor]:
        """The candidates held on this rank (local flat indices) and their positions in `cands`."""
        keep = torch.zeros(len(cands), dtype=torch.bool)
        flat = cands.flat_index.clone()
        for i, (off, loc) in enumerate(zip(self.offsets, self.local)):
            mine = (cands.tensor_index == i) & (flat >= off) & (flat < off + loc.numel())
            keep |= mine
            flat[mine] -= off
        pos = keep.nonzero().squeeze(1)
        return Candidates(cands.tensor_index[pos], flat[pos], cands.value[pos]), pos


class ShardedScores(Scores):
    """Scores of this rank's shard of every analysed parameter (see `ShardedSpace`).

    ``scores`` hold the local rows; `candidates` and `locate` speak of the full
    tensors, as a single process's `Scores` would.
    """

    def __init__(self, method, scores, shard: ShardedSpace, config=None, stats=None):
        super().__init__(method, scores, config=config, stats=stats)
        self.shard = shard
        self.stats["shard"] = {
            "rank": shard.rank, "world": shard.world,
            "rows": {n: list(r) for n, r in zip(shard.names, shard.rows)},
            "local_numel": shard.local_numel, "numel": shard.numel,
        }  # fmt: skip

    def candidates(self, k: int) -> Candidates:
        """The single-process top-k of the full scores (collective; the same on every rank)."""
        return sharded_topk(self.tensors(), self.shard.offsets, k, METHODS[self.method]["largest"])

    def flagged(self) -> Candidates:
        """This rank's flagged entries (full-tensor flat indices); not gathered."""
        c = super().flagged()
        off = torch.tensor(self.shard.offsets, dtype=torch.int64)
        return Candidates(c.tensor_index, c.flat_index + off[c.tensor_index], c.value)

    def locate(self, cands: Candidates):
        out = []
        for t, f, v in cands:
            idx = torch.unravel_index(torch.tensor(f), self.shard.shapes[t])
            out.append((self.names[t], tuple(int(i) for i in idx), v))
        return out


def sharded_topk(
    local: Sequence[torch.Tensor], offsets: Sequence[int], k: int, largest: bool = True
) -> Candidates:
    """`mftx.ops.topk` over tensors split by rows over the ranks, without gathering them.

    `local` are this rank's pieces, `offsets` the flat index of each piece's first
    entry in its full tensor. Each rank takes its own top k (the compiled op), looks
    up their exact values, and the ranks exchange those k candidates; the merge
    orders them by value, then (tensor, flat index) ascending: the op's tie order.
    """
    k = ops._checks.k_value(k)
    bad = torch.tensor([float(any(bool(torch.isnan(t).any()) for t in local))])
    if float(dist.all_sum(bad)[0]):
        raise ValueError("scores contain NaN (on some rank): no top-k")
    mine = ops.topk(local, k, largest)
    m = len(mine)
    exact = torch.empty(m, dtype=torch.float64)  # the ranking values in full precision
    for t in mine.tensor_index.unique().tolist():  # (Candidates keep float32)
        sel = mine.tensor_index == t
        exact[sel] = local[t].reshape(-1)[mine.flat_index[sel]].to(torch.float64)
    off = torch.tensor(list(offsets), dtype=torch.int64)
    kk = min(k, max(int(c) for c in dist.counts(m)))
    rank, world = dist.rank_world()
    pack = torch.zeros(kk, 4, dtype=torch.float64)
    pack[:m, 0] = 1
    pack[:m, 1] = mine.tensor_index[:kk].double()
    pack[:m, 3] = exact[:kk]
    idx = torch.zeros(kk, dtype=torch.int64)
    idx[:m] = mine.flat_index[:kk] + off[mine.tensor_index[:kk]]
    packs = [torch.zeros_like(pack) for _ in range(world)]
    idxs = [torch.zeros_like(idx) for _ in range(world)]
    torch.distributed.all_gather(packs, pack)
    torch.distributed.all_gather(idxs, idx)  # int64 exactly (float64 would round past 2^53)
    allp, alli = torch.cat(packs), torch.cat(idxs)
    valid = allp[:, 0] > 0
    allp, alli = allp[valid], alli[valid]
    t = allp[:, 1].long()
    order = torch.sort(alli, stable=True).indices
    order = order[torch.sort(t[order], stable=True).indices]
    order = order[torch.sort(allp[order, 3], descending=largest, stable=True).indices][:k]
    return Candidates(t[order], alli[order], allp[order, 3].float())


class ShardedMask:
    """Zero candidates (full-tensor indices, e.g. `ShardedScores.candidates`) on the shards;
    undo last first, bit for bit. Each rank writes only the entries it holds."""

    def __init__(self, shard: ShardedSpace):
        self.shard = shard
        self._stack: List[Tuple[Candidates, torch.Tensor]] = []

    def push(self, cands: Candidates) -> None:
        local, _ = self.shard.to_local(cands)
        self._stack.append((local, ops.mask_(self.shard.local, local)))

    def pop(self) -> None:
        local, saved = self._stack.pop()
        ops.restore_(self.shard.local, local, saved)

    def restore_all(self) -> None:
        while self._stack:
            self.pop()

    def __enter__(self) -> ShardedMask:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore_all()


# ---------------------------------------------------------------------------- scoring
def _lockstep(batches: List[Any], weights: List[float]):
    """(batch, weight) for as many steps as the rank with most batches has: FSDP2's
    forward and backward are collective, so ranks with fewer batches repeat their
    last one with weight 0."""
    counts = [int(c) for c in dist.counts(len(batches))]
    if min(counts) == 0:
        raise ValueError(
            f"a sharded model needs at least one batch on every rank (batches per rank: {counts})"
        )
    for j in range(max(counts)):
        if j < len(batches):
            yield batches[j], weights[j]
        else:
            yield batches[-1], 0.0


def _gradient(model, shard: ShardedSpace, batches, loss_fn, size, what: str):
    """The weighted mean gradient over the union of the ranks' batches, as local shards."""
    from .curvature.hvp import batch_weights

    weights = batch_weights(size, batches, what)
    total = sum(dist.counts(sum(weights)))
    if total == 0:
        raise ValueError(f"no samples to compute the {what} gradient on")
    _, world = dist.rank_world()
    model.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    with torch.enable_grad():
        for b, w in _lockstep(batches, weights):
            loss = loss_fn(model, b)
            # FSDP2 averages the ranks' gradients: scale so that the average is the union's mean.
            (loss * (w * world / total)).backward()
            loss_sum += float(loss.detach()) * w
    grads = []
    for p in shard.params:
        g = p.grad
        grads.append(torch.zeros_like(p.to_local()) if g is None else g.to_local().detach().clone())
    model.zero_grad(set_to_none=True)
    mean_loss = float(dist.all_sum(loss_sum)[0]) / total
    if not math.isfinite(mean_loss):
        raise NonFiniteError(f"the mean {what} is {mean_loss}")
    return grads, mean_loss


def _fit_ekfac(model, space: ParamSpace, shard: ShardedSpace, batches, loss_fn, cfg):
    """EK-FAC on the sharded model: factors summed and kept whole, Λ kept by row chunks."""
    blocks = ekfac.linear_blocks(model, space)
    f64 = torch.float64
    mods = dict(model.named_modules())
    ones = [1.0] * len(batches)
    n_local = sum(batch_size(b) for b in batches)
    if cfg.fisher == "sampled":
        offset = dist.example_offset(n_local)
        sampled = []
        with torch.no_grad():
            for b, w in _lockstep(batches, ones):
                if w:  # every rank runs the forward (collective); the padding steps draw nothing
                    sampled += ekfac.sampled_batches(model, [b], loss_fn, cfg.seed, offset)
                    offset += batch_size(b)
                else:
                    loss_fn.outputs(model, b)
        batches = sampled

    def passes():
        """Per step: for each block (ā, token weights, δ) of the batch, or None when padding."""
        for b, w in _lockstep(batches, ones):
            acts, deltas, hs = _capture(mods, blocks)
            try:
                with torch.enable_grad():
                    n = batch_size(b)
                    (loss_fn(model, b) * n * (1.0 if w else 0.0)).backward()
            finally:
                for h in hs:
                    h.remove()
            model.zero_grad(set_to_none=True)
            if not w:
                yield None
                continue
            n = batch_size(b)
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            out = []
            for blk in blocks:
                a = torch.cat([x.reshape(n, -1, blk.d_in) for x in acts[blk.module]], 1)
                ds = deltas[blk.module][::-1]  # backward runs last use first
                if len(ds) != len(acts[blk.module]):  # an output the loss does not reach
                    ds = [torch.zeros(n, x.reshape(n, -1, blk.d_in).shape[1], blk.d_out,
                                      dtype=x.dtype) for x in acts[blk.module]]  # fmt: skip
                d = torch.cat([x.reshape(n, -1, blk.d_out) for x in ds], 1)
                cols = ([a] if blk.weight is not None else []) + (
                    [torch.ones_like(a[..., :1])] if blk.bias is not None else []
                )
                tw = torch.ones(a.shape[:2], dtype=a.dtype)
                if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == tw.shape:
                    tw = mask.to(a.dtype)
                out.append((torch.cat(cols, -1), tw, d))
            yield out

    A = [torch.zeros(b.k, b.k, dtype=f64) for b in blocks]
    S = [torch.zeros(b.d_out, b.d_out, dtype=f64) for b in blocks]
    for step in passes():
        for i, (a, w, d) in enumerate(step or []):
            aw = a * w[..., None]
            A[i] += (aw.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1])).to(f64)
            d2 = d.reshape(-1, d.shape[-1])
            S[i] += (d2.T @ d2).to(f64)
    ekfac._sum_over_ranks(A + S, True)
    rows = _block_rows(blocks, shard)
    for i, b in enumerate(blocks):
        b.QA = torch.linalg.eigh(A[i])[1]
        b.QS = torch.linalg.eigh(S[i])[1]
        A[i] = S[i] = None
        b.lam = torch.zeros(rows[i][1] - rows[i][0], b.k, dtype=f64)  # this rank's row chunk
    for step in passes():
        for i, b in enumerate(blocks):
            full = torch.zeros(b.d_out, b.k, dtype=f64)
            if step is not None:
                a, _, d = step[i]
                rotated = torch.einsum("bto,bti->boi", d @ b.QS.to(d.dtype), a @ b.QA.to(a.dtype))
                full += (rotated * rotated).sum(0).to(f64)
            dist.all_sum(full)  # one module at a time: a module-sized temporary
            b.lam += full[rows[i][0] : rows[i][1]]
    n_all = int(sum(dist.counts(n_local)))
    for b in blocks:
        b.lam /= n_all
    return blocks, rows, n_all


def _capture(mods: Dict[str, nn.Module], blocks):
    """Forward hooks keeping each block's inputs and (through tensor hooks) output gradients."""
    acts: Dict[str, List[torch.Tensor]] = {blk.module: [] for blk in blocks}
    deltas: Dict[str, List[torch.Tensor]] = {blk.module: [] for blk in blocks}

    def hook(name):
        def fn(mod, inputs, out):
            acts[name].append(inputs[0].detach())
            out.register_hook(lambda g: deltas[name].append(g.detach()))

        return fn

    handles = [mods[blk.module].register_forward_hook(hook(blk.module)) for blk in blocks]
    return acts, deltas, handles


def _block_rows(blocks, shard: ShardedSpace) -> List[Tuple[int, int]]:
    out = []
    for b in blocks:
        rr = {shard.rows[i] for i in (b.weight, b.bias) if i is not None}
        if len(rr) != 1:
            raise ValueError(f"{b.module}: weight and bias are sharded over different rows {rr}")
        out.append(rr.pop())
    return out


def _ekfac_apply(blocks, rows, shard: ShardedSpace, g: List[torch.Tensor], damping: float):
    """(F_ekfac + λI)⁻¹ g on the shards, one module at a time."""
    _, world = dist.rank_world()
    out = [torch.zeros_like(t) for t in g]
    for b, (r0, r1) in zip(blocks, rows):
        cols = []
        if b.weight is not None:
            cols.append(g[b.weight].reshape(r1 - r0, b.d_in))
        if b.bias is not None:
            cols.append(g[b.bias].reshape(r1 - r0, 1))
        V = torch.cat(cols, 1).to(torch.float64)
        T = dist.all_sum(b.QS[r0:r1].T @ V @ b.QA)  # Q_Sᵀ V Q_A, whole
        W_mine = T[r0:r1] / (b.lam + damping)
        chunk = math.ceil(b.d_out / world)
        buf = torch.zeros(chunk, b.k, dtype=torch.float64)
        buf[: r1 - r0] = W_mine
        parts = [torch.zeros_like(buf) for _ in range(world)]
        torch.distributed.all_gather(parts, buf)
        W = torch.cat(parts)[: b.d_out]
        R = (b.QS[r0:r1] @ W @ b.QA.T).to(g[0].dtype)
        if b.weight is not None:
            out[b.weight].copy_(R[:, : b.d_in].reshape(out[b.weight].shape))
        if b.bias is not None:
            out[b.bias].copy_(R[:, -1].reshape(out[b.bias].shape))
    return out


def score(model: nn.Module, train: List[Any], val: List[Any], space: ParamSpace, loss_fn, cfg):
    """`mftx.score` for an FSDP2-sharded model (called by it): scores of this rank's shard."""
    from .curvature.hvp import resolve_batch_size

    m, solver = cfg.method, cfg.solver
    if m in ("obd",) or (m == "influence" and solver != "ekfac"):
        what = f"method={m!r}" + (f" with solver={solver!r}" if m == "influence" else "")
        raise ValueError(
            f"{what} needs curvature-vector products, which torch cannot take through an "
            "FSDP2-sharded model (torch.autograd.grad does not reach fully_shard's sharded "
            "parameters: they are all-gathered per forward and get gradients only through "
            f".backward()). On a sharded model use {', '.join(SUPPORTED)}; or load the whole "
            "model on each rank and score data-parallel (distributed=True)."
        )
    if cfg.backend != "eager":
        raise ValueError(f"a sharded model is scored with backend='eager', not {cfg.backend!r}")
    if cfg.hvp_batches is not None or cfg.num_examples is not None:
        raise ValueError("a sharded model takes neither hvp_batches nor num_examples")
    shard = ShardedSpace(space)
    size = resolve_batch_size(loss_fn, cfg.batch_size_fn)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    stats: Dict[str, Any] = {}
    try:
        theta = [t.to(torch.float64) for t in shard.local]
        if m == "magnitude":
            out = [t.abs() for t in shard.local]
        elif m == "gradient":
            g, stats["train_loss"] = _gradient(model, shard, train, loss_fn, size, "training loss")
            out = [
                (th.abs() - (th - gi.to(torch.float64) * cfg.lr).abs()).to(t.dtype)
                for th, gi, t in zip(theta, g, shard.local)
            ]
        else:
            g, stats["val_loss"] = _gradient(model, shard, val, loss_fn, size, "validation loss")
            if m == "taylor":
                out = [-(gi * t) for gi, t in zip(g, shard.local)]
            else:
                blocks, rows, n_all = _fit_ekfac(model, space, shard, train, loss_fn, cfg)
                lo = min((float(b.lam.min()) for b in blocks if b.lam.numel()), default=math.inf)
                hi = max((float(b.lam.max()) for b in blocks if b.lam.numel()), default=-math.inf)
                ext = torch.tensor([-lo, hi], dtype=torch.float64)
                torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
                lo, hi = -float(ext[0]), float(ext[1])
                if cfg.damping == "auto":
                    from .curvature import spectra

                    damping = spectra.auto_damping(lo, hi)
                else:
                    damping = float(cfg.damping)
                if damping <= 0 and lo <= 0:
                    raise ValueError("EK-FAC has zero eigenvalues: it needs damping > 0")
                s = _ekfac_apply(blocks, rows, shard, g, damping)
                out = [-(si * t) for si, t in zip(s, shard.local)]
                stats.update({"damping": damping, "ekfac": {
                    "fisher": cfg.fisher, "seed": cfg.seed, "modules": len(blocks),
                    "examples": n_all, "eigenvalue_max": hi,
                    "factor_bytes": sum(b.QA.nbytes + b.QS.nbytes for b in blocks),
                    "lambda_bytes": sum(b.lam.nbytes for b in blocks)}})  # fmt: skip
    finally:
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - t0
    return ShardedScores(
        m, {n: t.detach().cpu() for n, t in zip(shard.names, out)}, shard, stats=stats
    )
