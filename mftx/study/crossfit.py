"""The held-out stages of `mftx analyze`: which rows choose, which rows measure.

After a checkpoint's scores from all dev rows (`mftx.study.analysis`), `run` adds,
each as a resumable record in the checkpoint's output directory:

- ``split.json``: the seeded two-fold split of the dev rows (`mftx.study.heldout.two_fold`);
- ``scores-<method>@A`` / ``@B``: scores whose validation gradient comes from one half;
- ``heldout-<method>.json``: every sweep point of every score set measured on all
  rows and on each half, with the recalibration control (`mftx.study.protocol.run_sweeps`);
- ``heldout-random.json``: the random-k control (`mftx.study.protocol.run_random`);
- ``groupfid.json``: group fidelity, the actual change of loss on each half (and on
  all rows) when whole subsets are zeroed, against the predictions of every score set:
  in-sample and across halves in both directions (`mftx.study.groups`).

Repeated splits (``split_seeds``): the same stages for each further split seed, in
``splits/seed<N>/`` below the checkpoint's directory (no random-k control nor group
fidelity there), and
``splits.json``: every split's held-out summary per method
(`mftx.study.protocol.RepeatedSplits`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from .. import masking
from ..core.params import ParamSpace
from ..ops.indexing import FlatIndex
from ..scores import METHODS, Scores
from . import groups
from .checkpoint import Checkpoint
from .config import AnalyzeConfig
from .fidelity import implied_change
from .groups import GroupFidelity, GroupSample
from .heldout import RowSplit, two_fold
from .parallel import spread
from .protocol import Heldout, SplitInfo, run_random, run_sweeps, uses_validation

__all__ = ["run"]

#: A method's scores from one half: ``score_fn(label, cfg, half=(name, split))`` -> (scores, digest).
ScoreFn = Callable[..., Tuple[Scores, str]]


def _split(ck: Checkpoint, cfg: AnalyzeConfig) -> RowSplit:
    stage = ck.stage("split", None, {"seed": cfg.split_seed}, {"dev": ck.inputs["dev"]})
    prev = stage.previous()
    if prev is not None:
        return prev.result.split
    split = two_fold(ck.rows.labels.tolist(), cfg.split_seed)
    return stage.save(SplitInfo(split)).result.split


def _split_id(split: RowSplit) -> Dict[str, Any]:
    d = split.to_json()
    return {"seed": split.seed, "sha256_a": d["sha256_a"], "sha256_b": d["sha256_b"]}


def run(ck: Checkpoint, space: ParamSpace, cfg: AnalyzeConfig, scores: Dict[str, Scores],
        digests: Dict[str, str], score_fn: ScoreFn,
        reference: bool = True) -> Tuple[RowSplit, Dict[str, Heldout]]:  # fmt: skip
    """Fold scores, sweeps on every row set, the random-k control and group fidelity.

    `scores` / `digests`: each method's scores from all dev rows; `score_fn(label, cfg,
    half=(name, split))` gives (and records) a method's scores from one half.
    `reference=False` (a repeated split): methods that use the validation gradient
    sweep their fold scores only (the all-rows sweep does not depend on the split).
    Returns the split and the held-out records by method (``random``: the control).
    """
    split = _split(ck, cfg)

    def score_sets(label: str) -> Dict[str, Tuple[Scores, str]]:
        s = scores[label]
        sets = {"all": (s, digests[label])}
        if "val" in METHODS[s.method]["uses"]:
            for half in ("A", "B"):
                sets[half] = score_fn(label, cfg, half=(half, split))
            if not reference:
                del sets["all"]
        return sets

    labels = list(scores)
    sets_of = dict(zip(labels, spread(labels, score_sets)))
    base = {"data": ck.eval_settings, "split": _split_id(split)}
    k_max = max(cfg.ks)

    def sweeps(label: str) -> Heldout:
        if label == "random":  # the random-k control
            stage = ck.stage("heldout", "random", {**base, "seed": cfg.split_seed}, ck.dev_inputs())
            return run_random(stage, space, cfg.ks, cfg.random_draws, cfg.split_seed,
                              ck.model, ck.rows, split, cfg.progress)  # fmt: skip
        sets = sets_of[label]
        inputs = ck.dev_inputs(**{f"scores@{n}": d for n, (_, d) in sets.items()})
        stage = ck.stage("heldout", label, base, inputs)
        cands = {n: sc.candidates(k_max) for n, (sc, _) in sets.items()}
        return run_sweeps(stage, label, space, cands, cfg.ks, ck.model, ck.rows, split,
                          cfg.progress)  # fmt: skip

    jobs = labels + (["random"] if cfg.random_draws else [])
    held: Dict[str, Heldout] = dict(zip(jobs, spread(jobs, sweeps)))
    if cfg.group_subsets:
        # Predictions from every score set (all rows, half A, half B; methods that do not
        # use the validation gradient have only the all-rows set), actual changes on both
        # halves: in-sample and across halves, both ways.
        by_set = {
            label: {n: sets[n if uses_validation(label) else "all"][0] for n in ("all", "A", "B")}
            for label, sets in sets_of.items()
        }  # fmt: skip
        _group_fidelity(ck, space, cfg, split, by_set)
    return split, held


def _group_fidelity(ck, space: ParamSpace, cfg: AnalyzeConfig, split: RowSplit,
                    by_set: Dict[str, Dict[str, Scores]]) -> GroupFidelity:  # fmt: skip
    """`by_set[method][s]`: the method's scores from score set s (``all``, ``A``, ``B``).
    Subsets are drawn from the A scores' rankings (as before directions were added)."""
    methods = {m: sets["A"] for m, sets in by_set.items() if sets["A"].method != "magnitude"}
    layout = FlatIndex(space.numels)
    ks = masking.check_ks(list(cfg.group_ks))

    def flat(s: Scores) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(torch.float64) for t in implied_change(s)])

    preds = {m: flat(s) for m, s in methods.items()}
    other = {n: {m: flat(by_set[m][n]) if by_set[m][n] is not s else preds[m]
                 for m, s in methods.items()} for n in ("all", "B")}  # fmt: skip

    def glob(c):
        return layout.to_global(c.tensor_index, c.flat_index)

    ranked = {m: glob(s.candidates(max(ks))) for m, s in methods.items()}
    flagged = {m: glob(s.flagged()) for m, s in methods.items() if METHODS[s.method]["flag"]}
    subsets = groups.draw(layout.total, ks, cfg.group_subsets, cfg.split_seed, ranked, flagged,
                          cfg.group_flagged)  # fmt: skip
    settings = {"data": ck.eval_settings, "split": _split_id(split), "rows": "A+B",
                "dtype": cfg.fidelity_dtype}  # fmt: skip
    stage = ck.stage("groupfid", None, settings, ck.dev_inputs())
    prev = stage.previous()
    done = {x.key: x for x in prev.result.samples} if prev is not None else {}
    keys = {x.key() for x in subsets}
    if (
        prev is not None and prev.complete and keys <= set(done)
        and not _needs_quadratic(subsets, done, cfg.group_quadratic)
    ):  # fmt: skip
        samples, base = [done[x.key()] for x in subsets], prev.result.base_losses
    else:
        base = (prev.result.base_losses or None) if prev is not None else None
        samples, base = _measure_groups(ck, space, cfg, split, subsets, preds, done, stage, base)
    for sample, sub in zip(samples, subsets):  # predictions follow the current scores
        sample.predicted = {m: float(p[sub.index].sum()) for m, p in preds.items()}
        sample.predicted_sets = {n: {m: float(p[sub.index].sum()) for m, p in ps.items()}
                                 for n, ps in other.items()}  # fmt: skip
    record = GroupFidelity("A+B", base["B"], samples, groups.summarize(samples), base)
    return stage.save(record).result


def _quadratic_keys(subsets, n: int) -> set:
    """Keys of the first `n` random subsets of each k: those that get the quadratic term."""
    seen: Dict[int, int] = {}
    out = set()
    for x in subsets:
        if x.origin == "random" and seen.get(x.k, 0) < n:
            seen[x.k] = seen.get(x.k, 0) + 1
            out.add(x.key())
    return out


def _needs_quadratic(subsets, done, n: int) -> bool:
    return any(done[k].quadratic is None for k in _quadratic_keys(subsets, n) if k in done)


def _measure_groups(ck, space, cfg, split, subsets, preds, done, stage, base):
    """Zero each subset not measured yet (float64 copy of the model); returns samples, base loss."""
    import copy

    from ..core.objective import default_loss
    from ..curvature.hvp import Curvature

    dtype = getattr(torch, cfg.fidelity_dtype)
    model = copy.deepcopy(ck.model).to(dtype).eval()
    own = dict(model.named_parameters())
    params = [own[n] for n in space.names]
    halves = {"A": ck.rows.batches_for(split.a), "B": ck.rows.batches_for(split.b)}

    @torch.inference_mode()
    def loss() -> Dict[str, float]:
        """Mean cross-entropy on each half and on all their rows."""
        sums, counts = {}, {}
        for name, batches in halves.items():
            total, n = 0.0, 0
            for b in batches:
                logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                total += float(F.cross_entropy(logits.double(), b["labels"], reduction="sum"))
                n += b["labels"].shape[0]
            sums[name], counts[name] = total, n
        out = {name: sums[name] / counts[name] for name in halves}
        out["all"] = sum(sums.values()) / sum(counts.values())
        return out

    quad_keys = _quadratic_keys(subsets, cfg.group_quadratic)
    quadratic = None
    if quad_keys and "taylor" in preds:
        space64 = ParamSpace(space.names, tuple(params), space.model_numel)
        op = Curvature(model, space64, ck.rows.batches_for(split.a), default_loss(model))
        theta = space64.flatten(space64.detached())

        def quadratic(sub):
            if sub.key() not in quad_keys:
                return None
            v = torch.zeros_like(theta)
            v[sub.index] = theta[sub.index]
            return 0.5 * float(v @ op.matvec(v))

    # Reuse measured samples; recompute a sample only to add a missing quadratic term.
    reuse = {k: x for k, x in done.items() if not (k in quad_keys and x.quadratic is None)}
    kept = list(reuse.values())
    base = loss() if base is None else base

    def on_sample(x: GroupSample) -> None:
        kept.append(x)
        stage.save(GroupFidelity("A+B", base["B"], kept, {}, base), complete=False)

    samples = groups.measure(params, subsets, loss, preds, quadratic, reuse, on_sample,
                             cfg.progress, base=base)  # fmt: skip
    return samples, base
