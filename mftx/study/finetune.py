"""The mask fine-tuning experiment, first half: fine-tune to accuracy targets.

`finetune` trains a classifier with AdamW on an SST-2 subset and saves the first
checkpoint that reaches each dev-accuracy target; `mftx.study.analysis` analyses the
checkpoints. Everything written is JSON (through `mftx.fileio`) or safetensors.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .._config import help_field
from ..data import load_sst2, make_batches
from ..evaluate import evaluate, length_sorted
from ..fileio import read_json, write_json
from ..models import load_classifier, save_classifier

__all__ = [
    "DEFAULT_TARGETS",
    "FinetuneConfig",
    "checkpoints_of",
    "describe_finetune",
    "finetune",
]

log = logging.getLogger("mftx")

DEFAULT_TARGETS = (0.60, 0.75, 0.85, 0.88, 0.90)
SCHEDULES = ("constant", "linear")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ====================================================================== finetune


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (recorded with every checkpoint)."""

    model: str = help_field(
        "model name or path ('minilm': the embedded all-MiniLM-L6-v2)", "minilm"
    )
    data: Optional[str] = help_field(
        "directory with SST-2 train.tsv/dev.tsv (None: MFTX_DATA or hub)"
    )
    train_size: Optional[int] = help_field("training rows drawn with the seed (None: all)", 1000)
    batch_size: int = help_field("training batch size", 16)
    lr: float = help_field("AdamW learning rate", 2e-5)
    weight_decay: float = help_field("AdamW weight decay", 0.0)
    epochs: int = help_field("maximum number of epochs", 6)
    max_length: int = help_field("token truncation length", 64)
    targets: Sequence[float] = help_field(
        "dev-accuracy targets; the first checkpoint reaching each is saved",
        default_factory=lambda: list(DEFAULT_TARGETS),
    )
    eval_every: int = help_field("evaluate dev accuracy every N steps", 4)
    eval_batch_size: int = help_field("dev evaluation batch size", 64)
    seed: int = help_field("seed of the data subset, shuffling, head init and dropout", 0)
    prefix: str = help_field("checkpoint directory names: PREFIX-<target %>", "ckpt")
    schedule: str = help_field(
        "learning-rate schedule: constant | linear (warmup, then linear decay to 0 at the "
        "last step of the last epoch)",
        "constant",
    )
    warmup_ratio: float = help_field("linear schedule: share of all steps spent warming up", 0.0)
    state_every: int = help_field(
        "save the training state (weights, optimizer, RNG, position) every N steps, at an "
        "evaluation, so that an interrupted run resumes where it stopped; 0: never",
        0,
    )
    progress: bool = help_field("show progress bars", True)

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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.state_every < 0:
            raise ValueError(f"state_every must be >= 0, got {self.state_every}")


def target_name(t: float, prefix: str = "ckpt") -> str:
    return f"{prefix}-{round(t * 100):d}"


def lr_factor(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Multiplier of `cfg.lr` for optimiser step `step` (0-based) of `total`."""
    if cfg.schedule == "constant":
        return 1.0
    warm = round(cfg.warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


_STATE_FORMAT = "mftx.finetune-state/1"
# Recipe fields that may differ between an interrupted run and its resumption.
_RESUMABLE = ("progress", "state_every", "data")


def _save_state(state_dir: Path, model, opt, position: Dict[str, Any]) -> None:
    """Weights, optimiser moments, RNG and position, so that training resumes exactly.

    Written to a fresh directory that then replaces the old one: an interruption
    leaves either the previous state or the new one, never a mixture.
    """
    from safetensors.torch import save_file

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    sd = opt.state_dict()
    moments = {
        f"{i}.{key}": torch.as_tensor(val).detach().clone().contiguous()
        for i, st in sd["state"].items()
        for key, val in st.items()
    }
    moments["rng"] = torch.get_rng_state()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    write_json(tmp / "state.json", {"format": _STATE_FORMAT, **position, "param_groups": groups})
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        state_dir.replace(old)
    tmp.replace(state_dir)
    if old.exists():
        shutil.rmtree(old)


def _load_state(state_dir: Path, model, opt) -> Dict[str, Any]:
    from safetensors.torch import load_file

    position = read_json(state_dir / "state.json")
    if position.get("format") != _STATE_FORMAT:
        raise ValueError(f"{state_dir}: not a fine-tuning state ({position.get('format')!r})")
    model.load_state_dict(load_file(str(state_dir / "weights.safetensors")))
    moments = load_file(str(state_dir / "optimizer.safetensors"))
    torch.set_rng_state(moments.pop("rng"))
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, t in moments.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": position.pop("param_groups")})
    return position


def _check_resumable(saved: Dict[str, Any], recipe: Dict[str, Any], where: Path) -> None:
    diff = {
        k: (saved.get(k), recipe.get(k))
        for k in sorted(set(saved) | set(recipe))
        if k not in _RESUMABLE and saved.get(k) != recipe.get(k)
    }
    if diff:
        raise ValueError(
            f"{where} holds an interrupted run with another recipe {diff} (saved, requested); "
            "rerun with --force to start over"
        )


def finetune(cfg: FinetuneConfig, out: Path, force: bool = False) -> Dict[str, Any]:
    """Fine-tune and save the first checkpoint reaching each target; returns the summary.

    The summary (``finetune.json`` in `out`) records the recipe, the accuracy
    history and, for each target, the checkpoint that reached it or that it was
    never reached. A complete run on disk is reused unless `force`. With
    ``cfg.state_every`` set, the training state is saved in ``out/state`` and an
    interrupted run continues from the last saved step (same batches, learning
    rates, optimiser moments and dropout RNG as an uninterrupted run).
    """
    cfg.validate()
    out = Path(out)
    summary_path = out / "finetune.json"
    state_dir = out / "state"
    if summary_path.exists() and not force:
        summary = read_json(summary_path)
        if summary.get("complete"):
            log.info("fine-tuning already complete in %s (use --force to redo)", out)
            return summary
    if force and state_dir.exists():
        shutil.rmtree(state_dir)
    old_state = state_dir.with_name(state_dir.name + ".old")
    if not state_dir.exists() and old_state.exists() and not force:
        old_state.replace(state_dir)  # killed between _save_state's two renames: the last whole one
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)
    model, tok = load_classifier(cfg.model, seed=cfg.seed)
    data = load_sst2(cfg.data, cfg.train_size, cfg.seed, tokenizer=tok, max_length=cfg.max_length)
    dev = make_batches(
        length_sorted(data.dev, tok), tok, cfg.eval_batch_size, max_length=cfg.max_length
    )
    targets = sorted(set(float(t) for t in cfg.targets))
    recipe = {**asdict(cfg), "targets": targets, "optimizer": "AdamW"}
    summary: Dict[str, Any] = {
        "format": "mftx.finetune/1",
        "recipe": recipe,
        "data": data.provenance(),
        "history": [],
        "targets": {f"{t:.2f}": {"reached": False} for t in targets},
        "complete": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(data.train_batches(cfg.batch_size, shuffle=False))
    total = per_epoch * cfg.epochs
    step, start_epoch, start_batch, elapsed = 0, 0, 0, 0.0
    if state_dir.exists():
        position = _load_state(state_dir, model, opt)
        _check_resumable(position["summary"]["recipe"], recipe, state_dir)
        summary = position["summary"]
        step, start_epoch, start_batch = position["step"], position["epoch"], position["batch"]
        elapsed = position["seconds"]
        log.info("resuming %s at step %d (epoch %d, batch %d)", out, step, start_epoch, start_batch)
    t0 = time.perf_counter() - elapsed

    def check(epoch: int, next_batch: int) -> bool:
        m = evaluate(model, dev)
        entry = {
            "step": step, "epoch": epoch, **m, "lr": cfg.lr * lr_factor(cfg, max(step - 1, 0), total),
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
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
        if cfg.state_every and step % cfg.state_every == 0 and step > 0:
            position = {"step": step, "epoch": epoch, "batch": next_batch, "summary": summary,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
            _save_state(state_dir, model, opt, position)
        write_json(summary_path, summary)
        return all(v["reached"] for v in summary["targets"].values())

    done = check(0, 0) if step == 0 else all(v["reached"] for v in summary["targets"].values())
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        batches = data.train_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        first = start_batch if epoch == start_epoch else 0
        bar = tqdm(
            batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
            initial=first, total=len(batches),
        )  # fmt: skip
        for bi, batch in enumerate(batches):
            if bi < first:
                continue
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, total)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step % cfg.eval_every == 0:
                done = check(epoch, bi + 1)
                model.train()
                if done:
                    break
        bar.close()
    if step % cfg.eval_every != 0:
        check(cfg.epochs - 1, per_epoch)
    best = max(summary["history"], key=lambda h: h["accuracy"])
    summary["best"] = best
    summary["unreached"] = [k for k, v in summary["targets"].items() if not v["reached"]]
    summary["complete"] = True
    summary["steps"] = step
    write_json(summary_path, summary)
    if state_dir.exists():
        shutil.rmtree(state_dir)
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
