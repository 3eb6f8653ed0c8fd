"""`mftx analyze`: score, mask, compare and check the methods on fine-tuned checkpoints.

For each checkpoint, every stage writes one record (see `mftx.records`) in
``OUT/<checkpoint>/``:

- ``checkpoint.json``: where the checkpoint is, its metadata and dev baseline;
- ``scores-<method>.json`` (+ ``.safetensors``): each method's scores;
- ``sweep-<method>.json``: dev accuracy with the top-k candidates masked, per k;
- ``overlap-<influence method>.json``: gradient-flagged against influence-beneficial;
- ``fidelity.json``: predicted against actual loss change of zeroing single parameters;
- ``location-<method>.json``, ``spectrum-<curvature>.json``: where the top-k sets
  live, and the curvature's spectrum;
- with ``heldout``: the held-out stages of `mftx.crossfit` (the dev split, fold
  scores, held-out sweeps, the random-k control, group fidelity).

Every record holds the settings and input fingerprints (checkpoint weights,
training and dev batches, scores) it was computed with. A rerun reuses a
record only when both match, computes only what is missing (a new method, a
new k, more fidelity samples, the rest of an interrupted stage), and refuses,
naming the differing setting, when they do not (``force`` recomputes).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import __version__, crossfit, fileio, masking, records
from .data import load_sst2
from .evaluate import evaluate
from .experiments import _help
from .fidelity import run_fidelity
from .heldout import DevRows, RowSplit
from .indexing import FlatIndex
from .location import Location, location_table, space_table
from .models import load_classifier, read_metadata
from .params import ParamSpace, select_params
from .records import Baseline, CheckpointInfo, Overlap, RunIndex, ScoresInfo, Sweep, SweepPoint
from .scores import METHODS, Scores
from .scoring import ScoreConfig, score_with_config
from .spectra import spectrum
from .stages import Stage, digest_batches, digest_tensors

__all__ = ["DEFAULT_KS", "AnalyzeConfig", "Variant", "analyze", "overlap", "parse_method"]

log = logging.getLogger("mftx")

DEFAULT_KS = (100, 500, 1000, 5000, 10000, 50000, 100000)
DEFAULT_GROUP_KS = (10, 100, 1000, 10000)
DEFAULT_LOCATION_KS = (100, 1000, 5000)


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
    heldout: bool = _help(
        "also run the held-out protocol: a seeded two-fold split of dev; validation "
        "gradient, scores and best k from one half, accuracy on the other (both ways)",
        False,
    )
    split_seed: int = _help("seed of the two-fold dev split", 0)
    random_draws: int = _help(
        "held-out: draws of the random-k control (k random analysed parameters; 0: none)", 0
    )
    group_subsets: int = _help(
        "held-out: random subsets per k for group fidelity (0: no group fidelity)", 0
    )
    group_ks: Sequence[int] = _help(
        "group fidelity: subset sizes", default_factory=lambda: list(DEFAULT_GROUP_KS)
    )
    group_flagged: int = _help("group fidelity: random k-subsets of each flagged set", 10)
    group_quadratic: int = _help(
        "group fidelity: random subsets per k that also get the second-order group term "
        "½ θ_Sᵀ H θ_S (one validation Hessian-vector product each)",
        0,
    )
    spectrum_steps: int = _help(
        "Lanczos steps of the training-loss curvature spectrum (λ_min, λ_max, trace, "
        "density) per curvature the influence methods use, on their HVP batches (0: none)",
        0,
    )
    spectrum_probes: int = _help("spectrum: Lanczos runs for the density (30 steps each)", 3)
    location_ks: Sequence[int] = _help(
        "top-k sets whose layers and module kinds are counted (with the flagged set)",
        default_factory=lambda: list(DEFAULT_LOCATION_KS),
    )
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
        if self.spectrum_steps == 1 or self.spectrum_steps < 0 or self.spectrum_probes < 1:
            raise ValueError(
                f"spectrum_steps must be 0 (none) or >= 2 and spectrum_probes >= 1, got "
                f"{self.spectrum_steps} and {self.spectrum_probes}"
            )
        for name in ("random_draws", "group_subsets", "group_flagged", "group_quadratic"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.heldout:
            used = [n for n in ("random_draws", "group_subsets") if getattr(self, n)]
            if used:
                raise ValueError(f"{', '.join(used)} need the held-out protocol (heldout=True)")
        masking.check_ks(list(self.group_ks))
        masking.check_ks(list(self.location_ks))
        for m in self.methods:  # the scoring settings, before any work
            self.score_config(m).validate()

    def score_config(self, label: str, out: Optional[Path] = None) -> ScoreConfig:
        """The scoring settings of method `label`; with `out` (the checkpoint's output
        directory) solver='lanczos' keeps its eigenpairs there (lowrank-<label>.safetensors),
        so a rerun with another validation set or damping costs no curvature product."""
        v = parse_method(label)
        solver = v.solver or self.solver
        lowrank = None
        if out is not None and solver == "lanczos" and v.method == "influence":
            lowrank = str(Path(out) / f"lowrank-{label}.safetensors")
        return ScoreConfig(
            method=v.method, solver=solver, curvature=v.curvature or self.curvature,
            damping=v.damping or self.damping, rank=self.rank, fisher=self.fisher, lowrank_file=lowrank,
            max_iter=self.max_iter, tol=self.tol, lr=self.lr, hvp_mode=self.hvp_mode,
            cache_graphs=self.cache_graphs and self.hvp_mode == "double-backward",
            hvp_batches=self.hvp_batches, on_negative_curvature=self.on_negative_curvature,
            progress=self.progress,
        )  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """What a method label names: the method and the settings it overrides (None: the run's)."""

    method: str
    curvature: Optional[str] = None
    solver: Optional[str] = None
    damping: Optional[str] = None


#: Label tokens after the method: curvatures, solvers and 'auto' (damping='auto').
def _label_tokens() -> Dict[str, Tuple[str, str]]:
    from .hvp import CURVATURES
    from .solvers import SOLVERS

    tokens = {c: ("curvature", c) for c in CURVATURES}
    tokens.update({s: ("solver", s) for s in SOLVERS})
    tokens["auto"] = ("damping", "auto")
    return tokens


def parse_method(label: str) -> Variant:
    """A method label: the method, then optional tokens that override the run's settings
    for that method only, in any order, each kind at most once:

    - a curvature (``hessian``, ``ggn``),
    - a solver (``minres``, ``cg``, ``lissa``, ``explicit``, ``lanczos``, ``ekfac``),
    - ``auto``: damping="auto".

    'influence' -> Variant('influence'); 'influence-ggn-cg' -> the GGN solved by CG;
    'influence-cg-auto' -> auto-damped CG on the Hessian. So one analysis compares
    second-order variants side by side. Tokens other than a curvature apply to
    ``influence`` only (the other methods have no solve).
    """
    method, *rest = label.split("-")
    if method not in METHODS:
        raise ValueError(
            f"unknown method {label!r}; one of {sorted(METHODS)}, optionally followed by "
            "-<curvature>, -<solver>, -auto"
        )
    tokens = _label_tokens()
    found: Dict[str, str] = {}
    for tok in rest:
        if tok not in tokens:
            raise ValueError(f"unknown variant {tok!r} in {label!r}; one of {sorted(tokens)}")
        kind, value = tokens[tok]
        if kind in found:
            raise ValueError(f"{label!r} names the {kind} twice ({found[kind]!r}, {value!r})")
        if kind != "curvature" and method != "influence":
            raise ValueError(f"{label!r}: only influence takes a {kind} ({tok!r})")
        found[kind] = value
    return Variant(method, **found)


#: ScoreConfig fields that do not change the scores (left out of the recorded settings).
_NOT_SETTINGS = ("progress", "distributed", "lowrank_file")


def _score_settings(cfg: ScoreConfig) -> Dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}


_SCORE_DEFAULTS = {f"score.{k}": v for k, v in _score_settings(ScoreConfig()).items()}


class _Checkpoint:
    """One checkpoint's model, data, fingerprints and output directory during `analyze`."""

    def __init__(self, path: Path, cfg: AnalyzeConfig, root: Path, force: bool):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a model checkpoint (no config.json)")
        self.meta = read_metadata(self.path) if (self.path / "mftx.json").is_file() else {}
        self.name = self.path.name
        self.root, self.force = root, force
        self.out = root / self.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_classifier(str(self.path))
        seed = cfg.seed if cfg.seed is not None else int(self.meta.get("seed", 0))
        self.data = load_sst2(
            cfg.data, cfg.train_size, seed, tokenizer=self.tok, max_length=cfg.max_length
        )
        self.train = self.data.train_batches(cfg.batch_size, shuffle=True, seed=seed)
        #: The dev rows; their batches are length-sorted (metrics do not depend on order).
        self.rows = DevRows(self.data.dev, self.tok, cfg.eval_batch_size, cfg.max_length)
        self.dev = self.rows.batches
        #: Settings that define the dev batches, and those plus the training batches.
        self.eval_settings = {"eval_batch_size": cfg.eval_batch_size, "max_length": cfg.max_length}
        self.data_settings = {
            **self.eval_settings, "train_size": cfg.train_size, "seed": seed,
            "batch_size": cfg.batch_size,
        }  # fmt: skip
        self.inputs = {
            "weights": digest_tensors(self.model.state_dict().items()),
            "train": digest_batches(self.train),
            "dev": digest_batches(self.dev),
        }

    def stage(self, kind: str, method: Optional[str], settings: Dict[str, Any],
              inputs: Dict[str, str], **kw: Any) -> Stage:  # fmt: skip
        """This checkpoint's record of `kind` (paths in it relative to the run directory)."""
        path = self.out / f"{records.stem(kind, method)}.json"
        return Stage(path, kind, settings, inputs, self.root, self.force, **kw)

    def dev_inputs(self, **more: str) -> Dict[str, str]:
        return {"weights": self.inputs["weights"], "dev": self.inputs["dev"], **more}


def analyze(
    checkpoints: Sequence[Path],
    cfg: AnalyzeConfig,
    out: Path,
    force: bool = False,
    command: Optional[Sequence[Union[str, Path]]] = None,
) -> RunIndex:
    """Analyse each checkpoint; returns the run index (analysis.json). Resumes from `out`.

    `command`: the command line as arguments, path arguments as `Path` (they
    are recorded relative to `out`).
    """
    cfg.validate()
    if not checkpoints:
        raise ValueError("no checkpoints to analyse")
    out = Path(out)
    names = [Path(c).name for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint directory names must differ: {names}")
    out.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg)
    if cfg.data is not None:
        config["data"] = Path(cfg.data)
    index = RunIndex(config, names, list(command or []), __version__)
    # The index describes what the records hold: a new run's settings replace the old
    # ones once it has finished (a refused or interrupted rerun leaves them as they were).
    if force or not (out / "analysis.json").is_file():
        fileio.write_json(out / "analysis.json", index, root=out)
    for path in checkpoints:
        _analyze_checkpoint(_Checkpoint(Path(path), cfg, out, force), cfg)
    fileio.write_json(out / "analysis.json", index, root=out)
    return index


def _analyze_checkpoint(ck: _Checkpoint, cfg: AnalyzeConfig) -> None:
    space = select_params(ck.model)
    log.info("analysing %s: %d analysed parameters", ck.name, space.numel)
    info = _checkpoint_info(ck, space)
    if cfg.spectrum_steps:
        for curvature in _curvatures(cfg):
            _spectrum(ck, space, curvature, cfg)
    scores: Dict[str, Scores] = {}
    digests: Dict[str, str] = {}
    for label in cfg.methods:
        scores[label], digests[label] = _scores(ck, space, label, cfg)
    for label, s in scores.items():
        _sweep(ck, space, label, s, digests[label], cfg.ks, info.baseline, cfg.progress)
    if "gradient" in scores:
        for label in scores:
            if parse_method(label).method == "influence":
                _overlap(ck, scores, digests, label)
    if cfg.fidelity_samples > 0:
        settings = {"data": ck.eval_settings, "dtype": cfg.fidelity_dtype}
        stage = ck.stage("fidelity", None, settings, ck.dev_inputs())
        run_fidelity(
            stage, ck.model, space, ck.dev, scores, cfg.fidelity_samples, cfg.fidelity_dtype,
            progress=cfg.progress, desc=f"{ck.name} fidelity",
        )  # fmt: skip
    for label, s in scores.items():
        _location(ck, space, label, s, digests[label], cfg.location_ks)
    if cfg.heldout:
        crossfit.run(ck, space, cfg, scores, digests, partial(_scores, ck, space))


def _curvatures(cfg: AnalyzeConfig) -> List[str]:
    """The curvatures the run's influence methods solve with (the run's own if none)."""
    found = [cfg.score_config(m).curvature for m in cfg.methods
             if parse_method(m).method == "influence"]  # fmt: skip
    return sorted(set(found)) or [cfg.curvature]


def _spectrum(ck: _Checkpoint, space: ParamSpace, curvature: str, cfg: AnalyzeConfig):
    """The spectrum of the training loss's `curvature` on the influence solves' HVP batches
    (``spectrum-<curvature>.json``): what makes H + λI indefinite or not."""
    settings = {
        "data": ck.data_settings, "curvature": curvature, "hvp_batches": cfg.hvp_batches,
        "hvp_mode": cfg.hvp_mode, "steps": cfg.spectrum_steps, "probes": cfg.spectrum_probes,
        "seed": 0,
    }  # fmt: skip
    stage = ck.stage("spectrum", curvature, settings, ck.inputs)
    prev = stage.previous()
    if prev is not None:
        return prev.result
    log.info("%s: spectrum of the %s (%d Lanczos steps)", ck.name, curvature, cfg.spectrum_steps)
    spec = spectrum(
        ck.model, ck.train, params=space, curvature=curvature, hvp_mode=cfg.hvp_mode,
        hvp_batches=cfg.hvp_batches, seed=0, progress=cfg.progress,
        steps=cfg.spectrum_steps, probes=cfg.spectrum_probes,
    )  # fmt: skip
    log.info("%s: %s spectrum: %s", ck.name, curvature, spec.summary())
    return stage.save(spec).result


def _checkpoint_info(ck: _Checkpoint, space: ParamSpace) -> CheckpointInfo:
    stage = ck.stage("checkpoint", None, {"data": ck.eval_settings}, ck.dev_inputs())
    prev = stage.previous()
    if prev is not None:
        return prev.result
    info = CheckpointInfo(
        name=ck.name,
        path=ck.path,
        target=(ck.meta.get("targets") or [None])[0],
        baseline=Baseline(**evaluate(ck.model, ck.dev)),
        total_params=space.model_numel,
        analysed_params=space.numel,
        metadata=ck.meta,
        data=ck.data.provenance(),
    )
    return stage.save(info).result


def _scores(
    ck: _Checkpoint, space: ParamSpace, label: str, cfg: AnalyzeConfig,
    half: Optional[Tuple[str, RowSplit]] = None,
):  # fmt: skip
    """The scores of method `label` (a label such as 'influence-ggn') and their digest.

    With `half` = (name, split), the validation gradient comes from that half of
    the dev rows only (held-out protocol); the files are ``scores-<label>@<name>``.
    """
    scfg = cfg.score_config(label, ck.out)
    settings = {"data": ck.data_settings, "score": _score_settings(scfg)}
    val, inputs, name = ck.dev, ck.inputs, label
    if half is not None:
        rows = half[1].half(half[0])
        val = ck.rows.batches_for(rows)
        settings["rows"] = {
            "half": half[0],
            "split": half[1].to_json()[f"sha256_{half[0].lower()}"],
        }
        inputs = {**ck.inputs, "dev": digest_batches(val)}
        name = f"{label}@{half[0]}"
    stage = ck.stage("scores", name, settings, inputs, defaults=_SCORE_DEFAULTS)
    file = ck.out / f"scores-{name}.safetensors"
    prev = stage.previous()
    if prev is not None and file.is_file():
        s = Scores.load(file)
        digest = _digest(s)
        if digest != prev.result.digest:
            raise ValueError(
                f"{file} does not match its record {stage.path.name} (changed or replaced); "
                "rerun with --force to recompute it"
            )
        log.info("%s: %s scores loaded from %s", ck.name, name, file.name)
        return s, digest
    log.info("%s: scoring with %s", ck.name, name)
    s = score_with_config(ck.model, ck.train, val, scfg, params=space)
    s.save(file)
    digest = _digest(s)
    stage.save(_scores_info(name, file.name, digest, s))
    log.info("%s: %s done in %.1f s (%s)", ck.name, name, s.stats["seconds"], _brief(s))
    return s, digest


def _digest(s: Scores) -> str:
    return digest_tensors(s.scores.items())


def _scores_info(label: str, file: str, digest: str, s: Scores) -> ScoresInfo:
    solver = s.stats.get("solver") or {}
    return ScoresInfo(
        method=label,
        file=file,
        digest=digest,
        seconds=s.stats.get("seconds"),
        curvature=s.config.get("curvature") if solver else None,
        damping=s.stats.get("damping") if solver else None,  # the λ used (also for 'auto')
        hvp_batches_used=s.stats.get("hvp_batches_used"),
        n_hvp=s.stats.get("n_hvp"),
        **{k: solver.get(k) for k in ("iterations", "relative_residual", "converged", "reason")},
    )


def _brief(s: Scores) -> str:
    solver = s.stats.get("solver")
    if not solver:
        return "no solve"
    res = solver["relative_residual"]
    return (
        f"{solver['iterations']} {solver['solver']} iterations, relative residual "
        f"{'n/a' if res is None else f'{res:.2e}'}, {solver['reason']}"
    )


def _sweep(ck, space, label, s: Scores, digest: str, ks, baseline: Baseline, progress) -> Sweep:
    """Dev accuracy with the top-k masked, for each requested k not on disk yet."""
    stage = ck.stage("sweep", label, {"data": ck.eval_settings}, ck.dev_inputs(scores=digest))
    prev = stage.previous()
    done = {p.k: p for p in prev.result.points} if prev is not None else {}
    ks = masking.check_ks(list(ks))
    if prev is not None and prev.complete and set(ks) <= set(done):
        return prev.result
    record = Sweep(label, baseline, [], None)

    def save(point: Dict[str, Any]) -> None:
        done[point["k"]] = SweepPoint(**point)
        record.points = [done[k] for k in sorted(done)]
        stage.save(record, complete=False)

    every = sorted(set(ks) | set(done))
    masking.sweep(
        space, s.candidates(max(every)), every, lambda: evaluate(ck.model, ck.dev),
        done={k: asdict(p) for k, p in done.items()}, on_point=save, progress=progress,
        desc=f"{ck.name} {label} sweep",
    )  # fmt: skip
    record.points = [done[k] for k in sorted(done)]
    record.restored_bitwise = True  # sweep raises otherwise
    return stage.save(record).result


def overlap(gradient: Scores, influence: Scores, influence_method: Optional[str] = None) -> Overlap:
    """Gradient-flagged G, influence-beneficial B, |G ∩ B| and the rate |G \\ B| / |G|."""
    layout = FlatIndex.of(gradient.tensors())
    g = gradient.flagged()
    b = influence.flagged()
    g_idx = layout.to_global(g.tensor_index, g.flat_index)
    b_idx = layout.to_global(b.tensor_index, b.flat_index)
    both = int(torch.isin(g_idx, b_idx).sum())
    return Overlap.of_counts(
        len(g), len(b), both, analysed_params=layout.total, influence_method=influence_method
    )


def _overlap(ck, scores: Dict[str, Scores], digests: Dict[str, str], label: str) -> Overlap:
    inputs = {"scores-gradient": digests["gradient"], f"scores-{label}": digests[label]}
    stage = ck.stage("overlap", label, {}, inputs)
    prev = stage.previous()
    if prev is not None:
        return prev.result
    return stage.save(overlap(scores["gradient"], scores[label], label)).result


def _location(ck, space: ParamSpace, label: str, s: Scores, digest: str, ks) -> Location:
    """Layers and module kinds of the method's top-k and flagged entries."""
    ks = masking.check_ks(list(ks))
    stage = ck.stage("location", label, {"ks": ks}, {"scores": digest})
    prev = stage.previous()
    if prev is not None:
        return prev.result
    names, shapes = space.names, space.shapes
    sets = {f"top-{k}": location_table(names, shapes, s.candidates(k)) for k in ks}
    if METHODS[s.method]["flag"] is not None:
        sets["flagged"] = location_table(names, shapes, s.flagged())
    return stage.save(Location(label, sets, space_table(names, shapes))).result
