"""How well each method predicts the effect of zeroing one parameter.

`choose_samples` picks the parameters: half of them from the methods' top
candidates (shared out evenly), half uniformly at random from a seeded
stream. The choice is a function of the methods' scores, the count and the
seed only, and it grows monotonically with the count: asking for more samples
keeps every earlier one. `run_fidelity` measures the actual change of
validation loss for each chosen parameter (`ZeroingEvaluator`), reusing every
measurement a previous run of the same settings made (the record is saved
after each one, so an interrupted run resumes), and summarises each method's
predictions against the measurements.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from .. import fileio
from ..core.params import ParamSpace
from ..evaluate import ZeroingEvaluator
from ..ops.indexing import FlatIndex
from ..scores import Scores
from . import statistics
from .records import Fidelity, FidelitySample, FidelityStats
from .stages import Stage

__all__ = ["SAMPLE_SEED", "choose_samples", "implied_change", "run_fidelity", "summarize"]

log = logging.getLogger("mftx")

#: Seed of the random half of the fidelity samples.
SAMPLE_SEED = 1234
_CHUNK = 256  # random draws are taken in fixed chunks so the stream never depends on the count


def implied_change(s: Scores) -> List[torch.Tensor]:
    """Each method's prediction of the change of validation loss when zeroing a parameter.

    influence, taylor and obd predict it directly; the gradient rule does not
    predict a loss change, so its score is used with the sign of one
    (flagged = predicted to help): only ranks and signs are meaningful there.
    """
    if s.method == "gradient":
        return [-t for t in s.tensors()]
    return s.tensors()


def choose_samples(scores: Dict[str, Scores], n: int, seed: int = SAMPLE_SEED) -> Dict[int, str]:
    """Global flat index -> origin (``top-<method>`` or ``random``) of `n` parameters.

    ``n // 2`` come from the methods' top candidates, method i taking the
    j-th of them for every j ≡ i (mod number of methods), each going further
    down its list past parameters chosen already; the rest are drawn
    uniformly from a seeded stream, skipping repeats.
    """
    if not scores:
        raise ValueError("choose_samples needs the scores of at least one method")
    layout = FlatIndex.of(next(iter(scores.values())).tensors())
    if not 0 <= n <= layout.total:
        raise ValueError(f"fidelity samples must be in [0, {layout.total}], got {n}")
    methods = list(scores)
    n_top = n // 2
    chosen: Dict[int, str] = {}
    for i, m in enumerate(methods):
        quota = len(range(i, n_top, len(methods)))
        c = scores[m].candidates(min(quota + len(chosen), layout.total))
        got = 0
        for gi in layout.to_global(c.tensor_index, c.flat_index).tolist():
            if got == quota:
                break
            if gi not in chosen:
                chosen[gi] = f"top-{m}"
                got += 1
    gen = torch.Generator().manual_seed(seed)
    wanted = len(chosen) + n - n_top
    while len(chosen) < wanted:
        for gi in torch.randint(layout.total, (_CHUNK,), generator=gen).tolist():
            if len(chosen) == wanted:
                break
            chosen.setdefault(gi, "random")
    return chosen


def summarize(
    samples: Sequence[FidelitySample], methods: Sequence[str]
) -> Dict[str, FidelityStats]:
    """Spearman, Pearson and sign agreement of each method's predictions with the actual changes."""
    actual = [s.actual for s in samples]
    out = {}
    for m in methods:
        pred = [s.predicted[m] for s in samples]
        undefined = {}
        for name, finite in (("spearman", False), ("pearson", True)):
            reason = statistics.undefined_reason(pred, actual, finite=finite)
            if reason is not None:
                undefined[name] = reason
        out[m] = FidelityStats(
            m,
            statistics.spearman(pred, actual),
            statistics.pearson(pred, actual),
            statistics.sign_agreement(pred, actual),
            len(samples),
            undefined,
        )
    return out


def run_fidelity(
    stage: Stage,
    model: torch.nn.Module,
    space: ParamSpace,
    dev: Sequence,
    scores: Dict[str, Scores],
    n: int,
    dtype: str,
    progress: bool = False,
    desc: str = "fidelity",
) -> Fidelity:
    """Measure what `stage` does not hold yet, summarise, save; returns the complete record."""
    prev = stage.previous()
    measured = {s.key: s for s in prev.result.samples} if prev is not None else {}
    base_loss = prev.result.base_loss if prev is not None else None
    methods = [m for m in scores if scores[m].method != "magnitude"]
    chosen = choose_samples({m: scores[m] for m in methods}, n) if methods else {}
    layout = FlatIndex(space.numels)
    flat_pred = {m: torch.cat([t.reshape(-1) for t in implied_change(scores[m])]) for m in methods}
    todo = [gi for gi in sorted(chosen) if layout.split(gi) not in measured]
    if todo:
        log.info("%s: measuring %d of %d samples", desc, len(todo), len(chosen))
        evaluator = ZeroingEvaluator(model, space, dev, dtype=getattr(torch, dtype))
        base_loss = evaluator.base
        done: List[FidelitySample] = list(measured.values())
        for gi in tqdm(todo, desc=desc, disable=not progress, leave=False):
            t, f = layout.split(gi)
            value = float(space.params[t].detach().reshape(-1)[f])
            sample = FidelitySample(space.names[t], t, f, value, evaluator.delta(t, f))
            measured[sample.key] = sample
            done.append(sample)
            stage.save(Fidelity(dtype, n, done, {}, base_loss), complete=False)
    samples = []
    for gi in sorted(chosen):
        t, f = layout.split(gi)
        m = measured[(t, f)]
        predicted = {k: float(flat_pred[k][gi]) for k in methods}
        samples.append(FidelitySample(m.name, t, f, m.value, m.actual, chosen[gi], predicted))
    result = Fidelity(dtype, n, samples, summarize(samples, methods), base_loss)
    if prev is None or not prev.complete or fileio.dumps(prev.result) != fileio.dumps(result):
        stage.save(result, complete=True)
    return result
