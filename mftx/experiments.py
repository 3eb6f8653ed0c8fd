"""The mask fine-tuning experiment: fine-tune to accuracy targets, then analyse.

`finetune` trains a classifier with AdamW on an SST-2 subset and saves the first
checkpoint that reaches each dev-accuracy target. `analyze` scores each
checkpoint's parameters (gradient, influence, ...), sweeps masking over top-k,
compares the flagged sets and measures how well each method predicts the
actual effect of zeroing single parameters. Everything written is JSON or
safetensors; every stage resumes from what is on disk.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import masking, ops
from .data import load_sst2, make_batches
from .evaluate import ZeroingEvaluator, evaluate, length_sorted
from .models import load_classifier, read_metadata, save_classifier
from .scores import METHODS, Scores
from .scoring import ScoreConfig, score_with_config

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TARGETS",
    "AnalyzeConfig",
    "FinetuneConfig",
    "analyze",
    "finetune",
]

log = logging.getLogger("mftx")

DEFAULT_TARGETS = (0.60, 0.75, 0.85, 0.88, 0.90)
DEFAULT_KS = (100, 500, 1000, 5000, 10000, 50000, 100000)


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None


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


# ====================================================================== analyze


@dataclass
class AnalyzeConfig:
    """Settings of an analysis run (recorded in analysis.json)."""

    data: Optional[str] = _help("directory with SST-2 TSVs (None: MFTX_DATA or hub)")
    train_size: Optional[int] = _help("training rows (seeded subset; as in fine-tuning)", 1000)
    seed: Optional[int] = _help("data seed (None: the checkpoint's own)", None)
    methods: Sequence[str] = _help(
        "scoring methods", default_factory=lambda: ["gradient", "influence"]
    )
    ks: Sequence[int] = _help(
        "top-k grid of the masking sweep", default_factory=lambda: list(DEFAULT_KS)
    )
    batch_size: int = _help("training batch size for gradients and HVPs", 16)
    eval_batch_size: int = _help("dev batch size for evaluation and validation gradients", 64)
    max_length: int = _help("token truncation length", 64)
    lr: float = _help("lr of the gradient rule", 2e-5)
    damping: Union[float, str] = _help("λ of (H + λI), or 'auto' (from the spectrum)", 0.01)
    curvature: str = _help("hessian | ggn", "hessian")
    solver: str = _help("minres | cg | lissa | explicit | lanczos | ekfac", "minres")
    rank: int = _help("solver='lanczos': eigenpairs kept", 20)
    fisher: str = _help("solver='ekfac': sampled | empirical", "sampled")
    max_iter: int = _help("CG / MINRES iteration cap", 100)
    tol: float = _help("CG / MINRES relative residual tolerance", 1e-6)
    hvp_batches: Optional[int] = _help(
        "training batches used for HVPs (seeded subsample; None: all)"
    )
    hvp_mode: str = _help("rev-rev | fwd-rev | double-backward", "double-backward")
    cache_graphs: bool = _help("double-backward: reuse each batch's first-order graph", True)
    on_negative_curvature: str = _help("raise | stop", "stop")
    fidelity_samples: int = _help("parameters zeroed one at a time for the fidelity check", 500)
    fidelity_dtype: str = _help("float64 | float32 for the fidelity evaluation", "float64")
    progress: bool = _help("show progress bars", True)

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
        for m in self.methods:  # the scoring settings, before any work
            self.score_config(m).validate()

    def score_config(self, label: str, out: Optional[Path] = None) -> ScoreConfig:
        """The scoring settings of method `label`; with `out` (the checkpoint's output
        directory) solver='lanczos' keeps its eigenpairs there (lowrank-<label>.safetensors),
        so a rerun with another validation set or damping costs no curvature product."""
        method, curvature = parse_method(label)
        lowrank = None
        if out is not None and self.solver == "lanczos" and method == "influence":
            lowrank = str(Path(out) / f"lowrank-{label}.safetensors")
        return ScoreConfig(
            method=method, solver=self.solver, curvature=curvature or self.curvature,
            damping=self.damping, rank=self.rank, fisher=self.fisher, lowrank_file=lowrank,
            max_iter=self.max_iter, tol=self.tol, lr=self.lr, hvp_mode=self.hvp_mode,
            cache_graphs=self.cache_graphs and self.hvp_mode == "double-backward",
            hvp_batches=self.hvp_batches, on_negative_curvature=self.on_negative_curvature,
            progress=self.progress,
        )  # fmt: skip


def parse_method(label: str):
    """'influence' -> ('influence', None); 'influence-ggn' -> ('influence', 'ggn').

    A suffix names the curvature for that method only, so one analysis can
    compare influence through the Hessian and through the GGN.
    """
    from .hvp import CURVATURES

    method, _, variant = label.partition("-")
    if method not in METHODS:
        raise ValueError(
            f"unknown method {label!r}; one of {sorted(METHODS)} (optionally -hessian/-ggn)"
        )
    if variant and variant not in CURVATURES:
        raise ValueError(f"unknown variant {variant!r} in {label!r}; one of {CURVATURES}")
    return method, variant or None


# Config fields that change scores: a mismatch with scores on disk needs --force.
_SCORE_KEYS = ("method", "solver", "curvature", "damping", "max_iter", "tol", "lr", "hvp_mode",
               "hvp_batches", "n_train_batches", "n_val_batches", "rank", "fisher")  # fmt: skip


class _Checkpoint:
    """One checkpoint's model, data and output directory during `analyze`."""

    def __init__(self, path: Path, cfg: AnalyzeConfig, out: Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a model checkpoint (no config.json)")
        self.meta = read_metadata(self.path) if (self.path / "mftx.json").is_file() else {}
        self.name = self.path.name
        self.out = out / self.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_classifier(str(self.path))
        seed = cfg.seed if cfg.seed is not None else int(self.meta.get("seed", 0))
        data = load_sst2(
            cfg.data, cfg.train_size, seed, tokenizer=self.tok, max_length=cfg.max_length
        )
        self.data = data
        self.train = data.train_batches(cfg.batch_size, shuffle=True, seed=seed)
        dev_sorted = length_sorted(data.dev, self.tok)
        self.dev = make_batches(
            dev_sorted, self.tok, cfg.eval_batch_size, max_length=cfg.max_length
        )
        self.val = self.dev


def analyze(
    checkpoints: Sequence[Path],
    cfg: AnalyzeConfig,
    out: Path,
    force: bool = False,
    command: Optional[str] = None,
) -> Dict[str, Any]:
    """Analyse each checkpoint; returns analysis.json's content. Resumes from `out`."""
    cfg.validate()
    if not checkpoints:
        raise ValueError("no checkpoints to analyse")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(c).name for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint directory names must differ: {names}")
    from .params import select_params

    index = {
        "format": "mftx.analysis/1",
        "config": asdict(cfg),
        "command": command,
        "checkpoints": names,
    }
    write_json(out / "analysis.json", index)
    for path in checkpoints:
        ck = _Checkpoint(Path(path), cfg, out)
        space = select_params(ck.model)
        log.info("analysing %s: %d analysed parameters", ck.name, space.numel)
        info_path = ck.out / "checkpoint.json"
        if info_path.exists() and not force:
            info = read_json(info_path)
        else:
            info = {
                "name": ck.name,
                "path": str(ck.path.resolve()),
                "target": (ck.meta.get("targets") or [None])[0],
                "metadata": ck.meta,
                "baseline": evaluate(ck.model, ck.dev),
                "total_params": space.summary()["total"],
                "analysed_params": space.numel,
                "data": ck.data.provenance(),
            }
            write_json(info_path, info)
        scores = {m: _scores(ck, space, m, cfg, force) for m in cfg.methods}
        for label, s in scores.items():
            _sweep(ck, space, label, s, cfg, info["baseline"], force)
        infl = [m for m in scores if parse_method(m)[0] == "influence"]
        if "gradient" in scores and infl:
            # overlap.json: the reference study's table (plain influence when analysed);
            # overlap-<variant>.json: the same against every other influence variant.
            first = "influence" if "influence" in infl else infl[0]
            for m in infl:
                ov = {**overlap(scores["gradient"], scores[m]), "influence_method": m}
                write_json(ck.out / ("overlap.json" if m == first else f"overlap-{m}.json"), ov)
        if cfg.fidelity_samples > 0:
            _fidelity(ck, space, scores, cfg, force)
        del ck
    return index


def _scores(ck: _Checkpoint, space, method: str, cfg: AnalyzeConfig, force: bool) -> Scores:
    path = ck.out / f"scores-{method}.safetensors"
    scfg = cfg.score_config(method, ck.out)  # method: a label such as 'influence-ggn'
    if path.exists() and not force:
        s = Scores.load(path)
        want = {**asdict(scfg), "n_train_batches": len(ck.train), "n_val_batches": len(ck.val)}
        diff = {k: (s.config.get(k), want[k]) for k in _SCORE_KEYS if s.config.get(k) != want[k]}
        if diff:
            raise ValueError(
                f"{path} was computed with other settings {diff} (on disk, requested); "
                "rerun with --force to recompute"
            )
        log.info("%s: %s scores loaded from %s", ck.name, method, path)
        _write_solve(ck, method, s)
        return s
    log.info("%s: scoring with %s", ck.name, method)
    s = score_with_config(ck.model, ck.train, ck.val, scfg, params=space)
    s.save(path)
    _write_solve(ck, method, s)
    log.info("%s: %s done in %.1f s (%s)", ck.name, method, s.stats["seconds"], _brief(s))
    return s


def _write_solve(ck: _Checkpoint, label: str, s: Scores) -> None:
    """solve-<label>.json: how the scores were computed (for the report's solver table)."""
    solver = s.stats.get("solver") or {}
    write_json(
        ck.out / f"solve-{label}.json",
        {
            "method": label,
            "curvature": s.config.get("curvature") if solver else None,
            "damping": s.config.get("damping") if solver else None,
            "hvp_batches_used": s.stats.get("hvp_batches_used"),
            "iterations": solver.get("iterations"),
            "relative_residual": solver.get("relative_residual"),
            "converged": solver.get("converged"),
            "reason": solver.get("reason"),
            "n_hvp": s.stats.get("n_hvp"),
            "seconds": s.stats.get("seconds"),
        },
    )


def _brief(s: Scores) -> str:
    solver = s.stats.get("solver")
    if not solver:
        return "no solve"
    return (
        f"{solver['iterations']} {solver['solver']} iterations, relative residual "
        f"{solver['relative_residual']:.2e}, {solver['reason']}"
    )


def _sweep(ck, space, label: str, s: Scores, cfg: AnalyzeConfig, baseline, force: bool) -> None:
    path = ck.out / f"sweep-{label}.json"
    done = {}
    if path.exists() and not force:
        prev = read_json(path)
        done = {p["k"]: p for p in prev.get("points", [])}
    ks = masking.check_ks(list(cfg.ks))
    record = {"method": label, "baseline": baseline, "points": [], "restored_bitwise": None}

    def save(point):
        done[point["k"]] = point
        record["points"] = [done[k] for k in sorted(done)]
        write_json(path, record)

    cands = s.candidates(max(ks))
    points = masking.sweep(
        space, cands, ks, lambda: evaluate(ck.model, ck.dev), done=done, on_point=save,
        progress=cfg.progress, desc=f"{ck.name} {label} sweep",
    )  # fmt: skip
    record["points"] = points
    record["restored_bitwise"] = True  # sweep raises otherwise
    write_json(path, record)


def _global(cands: ops.Candidates, numels: Sequence[int]) -> torch.Tensor:
    starts = torch.tensor([0, *list(numels)], dtype=torch.int64).cumsum(0)[:-1]
    return starts[cands.tensor_index] + cands.flat_index


def overlap(gradient: Scores, influence: Scores) -> Dict[str, Any]:
    """Gradient-flagged G, influence-beneficial B, |G ∩ B| and the rate |G \\ B| / |G|."""
    numels = [t.numel() for t in gradient.tensors()]
    g = _global(gradient.flagged(), numels)
    b = _global(influence.flagged(), numels)
    both = int(torch.isin(g, b).sum())
    G, B = len(g), len(b)
    return {
        "gradient_flagged": G,
        "influence_beneficial": B,
        "both": both,
        "false_positive_rate": (G - both) / G if G else float("nan"),
        "analysed_params": sum(numels),
    }


def implied_change(s: Scores) -> List[torch.Tensor]:
    """Each method's prediction of the change of validation loss when zeroing a parameter.

    influence, taylor and obd predict it directly; the gradient rule does not
    predict a loss change, so its score is used with the sign of one
    (flagged = predicted to help): only ranks and signs are meaningful there.
    """
    if s.method == "gradient":
        return [-t for t in s.tensors()]
    return s.tensors()


def _fidelity(ck, space, scores: Dict[str, Scores], cfg: AnalyzeConfig, force: bool) -> None:
    from .report import pearson, spearman

    path = ck.out / "fidelity.json"
    methods = [m for m in scores if scores[m].method != "magnitude"]
    numels = list(space.numels)
    n = cfg.fidelity_samples
    prev = read_json(path) if path.exists() and not force else {}
    if prev.get("n_samples") == n and prev.get("summary"):
        return
    # Half from the methods' top candidates (shared out evenly), half uniformly at random.
    gen = torch.Generator().manual_seed(1234)
    chosen: Dict[int, str] = {}
    per = (n // 2) // max(1, len(methods))
    for m in methods:
        c = scores[m].candidates(per * 4)
        for gi in _global(c, numels).tolist():
            if len(chosen) >= per * (methods.index(m) + 1):
                break
            chosen.setdefault(gi, f"top-{m}")
    total = sum(numels)
    while len(chosen) < n:
        gi = int(torch.randint(total, (1,), generator=gen))
        chosen.setdefault(gi, "random")
    ends = torch.tensor(numels).cumsum(0)
    flat_pred = {m: torch.cat([t.reshape(-1) for t in implied_change(scores[m])]) for m in methods}
    old = {(s["tensor_index"], s["flat_index"]): s for s in prev.get("samples", [])}
    samples = []
    dtype = getattr(torch, cfg.fidelity_dtype)
    evaluator = ZeroingEvaluator(ck.model, space, ck.dev, dtype=dtype)
    items = sorted(chosen.items())
    bar = tqdm(items, desc=f"{ck.name} fidelity", disable=not cfg.progress, leave=False)
    for j, (gi, origin) in enumerate(bar):
        t = int(torch.searchsorted(ends, torch.tensor(gi), right=True))
        f = gi - (int(ends[t]) - numels[t])
        key = (t, f)
        if key in old:
            samples.append(old[key])
            continue
        samples.append(
            {
                "name": space.names[t],
                "tensor_index": t,
                "flat_index": f,
                "origin": origin,
                "value": float(space.params[t].detach().reshape(-1)[f]),
                "actual": evaluator.delta(t, f),
                "predicted": {m: float(flat_pred[m][gi]) for m in methods},
            }
        )
        if j % 10 == 9:
            write_json(path, {"n_samples": n, "samples": samples, "summary": None})
    actual = torch.tensor([s["actual"] for s in samples], dtype=torch.float64)
    summary = {}
    for m in methods:
        pred = torch.tensor([s["predicted"][m] for s in samples], dtype=torch.float64)
        summary[m] = {
            "spearman": spearman(pred, actual),
            "pearson": pearson(pred, actual),
            "sign_agreement": float((torch.sign(pred) == torch.sign(actual)).double().mean()),
            "n": len(samples),
        }
    write_json(
        path,
        {"n_samples": n, "dtype": cfg.fidelity_dtype, "base_loss": evaluator.base,
         "samples": samples, "summary": summary},
    )  # fmt: skip
