"""The mask fine-tuning experiment, first half: fine-tune to accuracy targets.

`finetune` trains a classifier with AdamW on an SST-2 subset and saves the first
checkpoint that reaches each dev-accuracy target; `mftx.analysis` analyses the
checkpoints. Everything written is JSON (through `mftx.fileio`) or safetensors.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data import load_sst2, make_batches
from .evaluate import evaluate, length_sorted
from .fileio import read_json, write_json
from .models import load_classifier, save_classifier

__all__ = [
    "DEFAULT_TARGETS",
    "FinetuneConfig",
    "checkpoints_of",
    "describe_finetune",
    "finetune",
]

log = logging.getLogger("mftx")

DEFAULT_TARGETS = (0.60, 0.75, 0.85, 0.88, 0.90)


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ====================================================================== finetune


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (recorded with every checkpoint)."""

    model: str = _help("model name or path ('minilm': the embedded all-MiniLM-L6-v2)", "minilm")
    data: Optional[str] = _help("directory with SST-2 train.tsv/dev.tsv (None: MFTX_DATA or hub)")
    train_size: Optional[int] = _help("training rows drawn with the seed (None: all)", 1000)
    batch_size: int = _help("training batch size", 16)
    lr: float = _help("AdamW learning rate", 2e-5)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    epochs: int = _help("maximum number of epochs", 6)
    max_length: int = _help("token truncation length", 64)
    targets: Sequence[float] = _help(
        "dev-accuracy targets; the first checkpoint reaching each is saved",
        default_factory=lambda: list(DEFAULT_TARGETS),
    )
    eval_every: int = _help("evaluate dev accuracy every N steps", 4)
    eval_batch_size: int = _help("dev evaluation batch size", 64)
    seed: int = _help("seed of the data subset, shuffling, head init and dropout", 0)
    prefix: str = _help("checkpoint directory names: PREFIX-<target %>", "ckpt")
    progress: bool = _help("show progress bars", True)

    def validate(self) -> None:
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix must be a plain name, got {self.prefix!r}")
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.targets:
            raise ValueError("no accuracy targets given")
        for t in self.targets:
            if not 0 < t <= 1:
                raise ValueError(f"accuracy targets are fractions in (0, 1], got {t}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")


def target_name(t: float, prefix: str = "ckpt") -> str:
    return f"{prefix}-{round(t * 100):d}"


def finetune(cfg: FinetuneConfig, out: Path, force: bool = False) -> Dict[str, Any]:
    """Fine-tune and save the first checkpoint reaching each target; returns the summary.

    The summary (``finetune.json`` in `out`) records the recipe, the accuracy
    history and, for each target, the checkpoint that reached it or that it was
    never reached. A complete run on disk is reused unless `force`.
    """
    cfg.validate()
    out = Path(out)
    summary_path = out / "finetune.json"
    if summary_path.exists() and not force:
        summary = read_json(summary_path)
        if summary.get("complete"):
            log.info("fine-tuning already complete in %s (use --force to redo)", out)
            return summary
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)
    model, tok = load_classifier(cfg.model, seed=cfg.seed)
    data = load_sst2(cfg.data, cfg.train_size, cfg.seed, tokenizer=tok, max_length=cfg.max_length)
    dev = make_batches(
        length_sorted(data.dev, tok), tok, cfg.eval_batch_size, max_length=cfg.max_length
    )
    targets = sorted(set(float(t) for t in cfg.targets))
    recipe = {**asdict(cfg), "targets": targets, "optimizer": "AdamW", "schedule": "constant"}
    summary: Dict[str, Any] = {
        "format": "mftx.finetune/1",
        "recipe": recipe,
        "data": data.provenance(),
        "history": [],
        "targets": {f"{t:.2f}": {"reached": False} for t in targets},
        "complete": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, t0 = 0, time.perf_counter()

    def check(epoch: int) -> bool:
        m = evaluate(model, dev)
        entry = {"step": step, "epoch": epoch, **m, "seconds": time.perf_counter() - t0}
        summary["history"].append(entry)
        log.info("step %d: dev accuracy %.4f, loss %.4f", step, m["accuracy"], m["loss"])
        hit = [
            t
            for t in targets
            if not summary["targets"][f"{t:.2f}"]["reached"] and m["accuracy"] >= t
        ]
        if hit:
            name = target_name(hit[0], cfg.prefix)
            meta = {
                **entry,
                "targets": hit,
                "seed": cfg.seed,
                "data": data.provenance(),
                "recipe": recipe,
                "model": cfg.model,
            }
            save_classifier(model, tok, out / name, meta)
            for t in hit:
                summary["targets"][f"{t:.2f}"] = {"reached": True, "checkpoint": name, **entry}
            log.info("targets %s reached at step %d: saved %s", hit, step, out / name)
        write_json(summary_path, summary)
        return all(v["reached"] for v in summary["targets"].values())

    done = check(0)
    model.train()
    for epoch in range(cfg.epochs):
        if done:
            break
        batches = data.train_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
        for batch in bar:
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step % cfg.eval_every == 0:
                done = check(epoch)
                model.train()
                if done:
                    break
    if step % cfg.eval_every != 0:
        check(cfg.epochs - 1)
    best = max(summary["history"], key=lambda h: h["accuracy"])
    summary["best"] = best
    summary["unreached"] = [k for k, v in summary["targets"].items() if not v["reached"]]
    summary["complete"] = True
    summary["steps"] = step
    write_json(summary_path, summary)
    return summary


def describe_finetune(summary: Dict[str, Any]) -> str:
    """Plain-language lines: which targets were reached where, which never."""
    lines = []
    for t, v in summary["targets"].items():
        pct = f"{float(t) * 100:.0f} %"
        if v["reached"]:
            lines.append(
                f"target {pct}: reached at step {v['step']} (dev accuracy "
                f"{v['accuracy'] * 100:.1f} %) -> {v['checkpoint']}"
            )
        else:
            b = summary.get("best", {})
            lines.append(
                f"target {pct}: NOT reached in {summary.get('steps', '?')} steps "
                f"(best dev accuracy {b.get('accuracy', float('nan')) * 100:.1f} % at step "
                f"{b.get('step', '?')})"
            )
    return "\n".join(lines)


def checkpoints_of(finetune_dir: Path) -> List[Path]:
    """The distinct checkpoints a fine-tuning run saved, in target order."""
    summary = read_json(Path(finetune_dir) / "finetune.json")
    names = []
    for v in summary["targets"].values():
        if v.get("reached") and v["checkpoint"] not in names:
            names.append(v["checkpoint"])
    return [Path(finetune_dir) / n for n in names]
