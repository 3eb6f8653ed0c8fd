"""The fresh test set: rows no choice has seen, measured once.

The 1,000-row fine-tuning recipes leave about 66,000 labelled SST-2 training rows
unused. `unused_rows` draws a seeded set of them, disjoint from the rows the
checkpoint was fine-tuned on (read from its ``mftx.json``) and recorded with a
SHA-256 of their row numbers. Everything is chosen on the dev set — the
scores (validation gradient of all dev rows), the k (best dev accuracy, k = 0
a candidate), the logit offset (best on all dev rows) and the k after
recalibration (best dev accuracy after each masked model's own dev offset) —
and then measured on the fresh rows, once:

- gain: masked at the dev-chosen k minus unmasked;
- recalibration alone: unmasked with the dev offset minus unmasked;
- beyond recalibration: (masked + its dev offset) − (unmasked + its dev offset)
  at the k chosen after recalibration;

each with a paired bootstrap interval over the fresh rows and McNemar's test
(`mftx.study.statistics`). The record keeps every evaluated row's prediction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import masking
from ..core.params import ParamSpace
from ..data import load_sst2
from ..ops import Candidates
from .heldout import DevRows, best_offset, decode_rows, encode_rows
from .schema import Reader, register
from .stages import Stage
from .statistics import mcnemar, paired_difference

__all__ = ["FreshMethod", "FreshTest", "run_fresh", "unused_rows"]

RESAMPLES = 2000


def _digest(rows: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(rows)).encode()).hexdigest()


def unused_rows(
    source: Optional[str], meta: Dict[str, Any], n: int, draw_seed: int
) -> Tuple[List[Tuple[str, int]], List[int]]:
    """`n` SST-2 training rows the checkpoint was not fine-tuned on: (examples, file rows).

    `meta` is the checkpoint's ``mftx.json``: its ``data`` entry names the fine-tuning
    subset (``train_size`` rows drawn with ``seed``, as `mftx.data.load_sst2` draws
    them). The fresh rows are a seeded draw (`draw_seed`) from the rest, in file order.
    Raises ValueError, naming the reason, when the checkpoint does not say which rows
    it was trained on, was trained on every row, or too few rows are left.
    """
    if n < 1:
        raise ValueError(f"fresh rows: n must be >= 1, got {n}")
    data_meta = meta.get("data") or {}
    if "seed" not in data_meta or "train_size" not in data_meta:
        raise ValueError(
            "fresh test set: the checkpoint's mftx.json does not say which training rows it "
            "was fine-tuned on (data.seed, data.train_size); fine-tune it with `mftx "
            "finetune`, or run without --fresh-rows"
        )
    full = load_sst2(source, None, 0)  # every training row, in file order
    total, size = len(full.train), data_meta["train_size"]
    if size is None or int(size) >= total:
        raise ValueError(
            f"fresh test set: the checkpoint was fine-tuned on all {total:,} training rows; "
            "no unused row is left (run without --fresh-rows for this checkpoint)"
        )
    gen = torch.Generator().manual_seed(int(data_meta["seed"]))
    used = set(torch.randperm(total, generator=gen)[: int(size)].tolist())
    pool = [i for i in range(total) if i not in used]
    if n > len(pool):
        raise ValueError(f"fresh test set: {n:,} rows asked, {len(pool):,} unused rows left")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(draw_seed))[:n]
    rows = sorted(pool[j] for j in pick.tolist())
    return [full.train[i] for i in rows], rows


@dataclass
class FreshMethod:
    """One method on the fresh rows: the dev choices and what they give there.

    ``dev``: per k (0 = unmasked), dev accuracy and dev accuracy after the masked
    model's own dev offset; ``best_k`` / ``recal_best_k``: the dev choices;
    ``pred``: fresh-row predictions at ``best_k``; ``pred_recal``: at ``recal_best_k``
    with its dev offset.
    """

    method: str
    dev: Dict[int, Dict[str, float]]
    best_k: int
    recal_best_k: int
    accuracy: float
    recal_accuracy: float
    pred: str
    pred_recal: str

    def to_json(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["dev"] = {str(k): v for k, v in self.dev.items()}
        return d

    @classmethod
    def from_json(cls, r: Reader) -> FreshMethod:
        dev = {int(k): {n: float(x) for n, x in v.obj.items()} for k, v in r.mapping("dev").items()}
        return cls(r.str("method"), dev, r.int("best_k"), r.int("recal_best_k"),
                   r.float("accuracy"), r.float("recal_accuracy"), r.str("pred"),
                   r.str("pred_recal"))  # fmt: skip


@register("fresh", 1, per_method=True)
@dataclass
class FreshTest:
    """The fresh rows (file row numbers and their hash), the unmasked model on them, and
    each method's dev-chosen masking measured there."""

    rows: List[int]
    sha256: str
    draw_seed: int
    labels: str
    baseline: float
    baseline_pred: str
    recalibrated: float
    recal_pred: str
    methods: Dict[str, FreshMethod] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "methods"}
        d["methods"] = {m: x.to_json() for m, x in self.methods.items()}
        return d

    @classmethod
    def from_json(cls, r: Reader) -> FreshTest:
        rows = [int(i) for i in r.list("rows")]
        sha = r.str("sha256")
        if _digest(rows) != sha:
            raise r.fail("rows", "do not match their sha256")
        methods = {m: FreshMethod.from_json(sub) for m, sub in r.mapping("methods").items()}
        return cls(rows, sha, r.int("draw_seed"), r.str("labels"), r.float("baseline"),
                   r.str("baseline_pred"), r.float("recalibrated"), r.str("recal_pred"),
                   methods)  # fmt: skip

    def summary(self, method: str) -> Dict[str, Any]:
        """Gains on the fresh rows with paired bootstrap intervals and McNemar's test."""
        m = self.methods[method]
        y = decode_rows(self.labels)

        def correct(pred: str) -> torch.Tensor:
            return (decode_rows(pred) == y).double()

        def compare(new: str, old: str, seed: int) -> Dict[str, Any]:
            a, b = correct(new), correct(old)
            ci = paired_difference([(a, b)], resamples=RESAMPLES, seed=seed)
            return {**ci, **{f"mcnemar_{k}": v for k, v in mcnemar(a, b).items()}}

        return {
            "method": method, "rows": len(self.rows), "baseline": self.baseline,
            "best_k": m.best_k, "accuracy": m.accuracy,
            "gain": compare(m.pred, self.baseline_pred, 0),
            "recalibration_alone": compare(self.recal_pred, self.baseline_pred, 1),
            "recal_best_k": m.recal_best_k, "masked_recalibrated": m.recal_accuracy,
            "beyond_recalibration": compare(m.pred_recal, self.recal_pred, 2),
        }  # fmt: skip


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def run_fresh(
    stage: Stage,
    space: ParamSpace,
    model,
    dev: DevRows,
    fresh: DevRows,
    file_rows: List[int],
    draw_seed: int,
    candidates: Dict[str, Candidates],
    ks: Sequence[int],
    progress: bool = True,
) -> FreshTest:
    """Choose on dev, measure on the fresh rows, for each method's all-dev-rows candidates."""
    prev = stage.previous()
    record = prev.result if prev is not None else None
    if record is not None and prev.complete and set(candidates) <= set(record.methods):
        return record
    yd, yf = dev.labels, fresh.labels

    def measure_dev() -> Dict[str, Any]:
        zd = dev.logits(model)
        off = best_offset(zd, yd)
        return {"dev": _acc(zd.argmax(-1), yd), "dev_recal": _acc((zd + off).argmax(-1), yd),
                "offset": off}  # fmt: skip

    def measure_fresh(off: torch.Tensor) -> Dict[str, torch.Tensor]:
        zf = fresh.logits(model)
        return {"fresh": zf.argmax(-1), "fresh_recal": (zf + off).argmax(-1)}

    base_dev = measure_dev()
    if record is None:
        base = measure_fresh(base_dev["offset"])
        record = FreshTest(
            file_rows, _digest(file_rows), draw_seed, encode_rows(yf),
            _acc(base["fresh"], yf), encode_rows(base["fresh"]),
            _acc(base["fresh_recal"], yf), encode_rows(base["fresh_recal"]),
        )  # fmt: skip
        stage.save(record, complete=False)
    for method, cands in candidates.items():
        if method in record.methods:
            continue
        # 1. Choose on dev: k by accuracy, and k by accuracy after the model's own offset.
        points = {0: base_dev}
        for p in masking.sweep(space, cands, ks, measure_dev, progress=progress,
                               desc=f"fresh {method}: dev"):  # fmt: skip
            points[p["k"]] = p
        best = min(points, key=lambda k: (-points[k]["dev"], k))
        rbest = min(points, key=lambda k: (-points[k]["dev_recal"], k))
        # 2. Measure the two choices on the fresh rows, once each.
        chosen = sorted({k for k in (best, rbest) if k > 0})
        at = {0: {"k": 0, **measure_fresh(base_dev["offset"])}} if 0 in (best, rbest) else {}
        if chosen:
            offsets = iter([points[k]["offset"] for k in chosen])  # the sweep goes up `chosen`
            for p in masking.sweep(space, cands, chosen, lambda it=offsets: measure_fresh(next(it)),
                                   progress=False):  # fmt: skip
                at[p["k"]] = p
        record.methods[method] = FreshMethod(
            method, {k: {"accuracy": p["dev"], "recalibrated": p["dev_recal"]}
                     for k, p in points.items()},
            best, rbest, _acc(at[best]["fresh"], yf), _acc(at[rbest]["fresh_recal"], yf),
            encode_rows(at[best]["fresh"]), encode_rows(at[rbest]["fresh_recal"]),
        )  # fmt: skip
        stage.save(record, complete=False)
    return stage.save(record).result
