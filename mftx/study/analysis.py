"""`mftx analyze`: score, mask, compare and check the methods on fine-tuned checkpoints.

For each checkpoint, every stage writes one record (see `mftx.study.records`) in
``OUT/<checkpoint>/``:

- ``checkpoint.json``: where the checkpoint is, its metadata and dev baseline;
- ``scores-<method>.json`` (+ ``.safetensors``): each method's scores;
- ``sweep-<method>.json``: dev accuracy with the top-k candidates masked, per k;
- ``overlap-<influence method>.json``: gradient-flagged against influence-beneficial;
- ``sensitivity-<family>.json``: one influence solve at several iteration caps or ranks
  (labels ``…-it<N>``, ``…-r<N>``): top-k overlap and change of the scores between
  neighbouring settings (`mftx.study.sensitivity`);
- ``fidelity.json``: predicted against actual loss change of zeroing single parameters;
- ``location-<method>.json``, ``spectrum-<curvature>.json``: where the top-k sets
  live, and the curvature's spectrum;
- with ``heldout``: the held-out stages of `mftx.study.crossfit` (the dev split, fold
  scores, held-out sweeps, the random-k control, group fidelity).

Every record holds the settings and input fingerprints (checkpoint weights,
training and dev batches, scores) it was computed with. A rerun reuses a
record only when both match, computes only what is missing (a new method, a
new k, more fidelity samples, the rest of an interrupted stage), and refuses,
naming the differing setting, when they do not (``force`` recomputes).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import fileio, masking
from .._version import __version__
from ..core.params import ParamSpace, select_params
from ..curvature.spectra import spectrum
from ..errors import ConvergenceWarning
from ..evaluate import evaluate
from ..models import read_metadata
from ..ops.indexing import FlatIndex
from ..scores import METHODS, Scores
from ..scoring import ScoreConfig, score_with_config
from . import crossfit, parallel, sensitivity
from .checkpoint import Checkpoint
from .config import AnalyzeConfig, parse_method
from .fidelity import run_fidelity
from .fresh import run_fresh, unused_rows
from .heldout import DevRows, RowSplit
from .location import Location, location_table, space_table
from .parallel import spread
from .protocol import RepeatedSplits
from .records import Baseline, CheckpointInfo, Overlap, RunIndex, ScoresInfo, Sweep, SweepPoint
from .report.summaries import split_summary
from .sensitivity import Sensitivity
from .stages import Stage, digest_batches, digest_tensors

__all__ = ["analyze", "overlap"]

log = logging.getLogger("mftx")

#: ScoreConfig fields that do not change the scores (left out of the recorded settings).
_NOT_SETTINGS = ("progress", "distributed", "lowrank_file", "spectrum")


def _score_settings(cfg: ScoreConfig) -> Dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}


_SCORE_DEFAULTS = {f"score.{k}": v for k, v in _score_settings(ScoreConfig()).items()}


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
    if cfg.fresh_rows:  # every checkpoint can have its fresh rows, before any work
        for path in checkpoints:
            meta_file = Path(path) / "mftx.json"
            meta = read_metadata(Path(path)) if meta_file.is_file() else {}
            try:
                unused_rows(cfg.data, meta, cfg.fresh_rows, cfg.fresh_seed)
            except ValueError as err:
                raise ValueError(f"{Path(path).name}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg)
    if cfg.data is not None:
        config["data"] = Path(cfg.data)
    index = RunIndex(config, names, list(command or []), __version__)
    split = parallel.current()  # under torchrun: stages spread over the processes
    if split is not None:
        split.attach(out)
    writer = split is None or split.writer
    # The index describes what the records hold: a new run's settings replace the old
    # ones once it has finished (a refused or interrupted rerun leaves them as they were).
    if writer and (force or not (out / "analysis.json").is_file()):
        fileio.write_json(out / "analysis.json", index, root=out)
    for path in checkpoints:
        _analyze_checkpoint(Checkpoint(Path(path), cfg, out, force), cfg)
    if split is not None:
        split.finish()  # rank 0: once every process is done
    if writer:
        fileio.write_json(out / "analysis.json", index, root=out)
    return index


def _analyze_checkpoint(ck: Checkpoint, cfg: AnalyzeConfig) -> None:
    space = select_params(ck.model)
    log.info("analysing %s: %d analysed parameters", ck.name, space.numel)
    info = _checkpoint_info(ck, space)
    # Under torchrun, `spread` gives each method (curvature, split seed, …) to one process.
    spectra = {}
    if cfg.spectrum_steps:
        curvatures = _curvatures(cfg)
        got = spread(curvatures, lambda c: _spectrum(ck, space, c, cfg))
        spectra = dict(zip(curvatures, got))

    def one(label: str) -> Tuple[Scores, str]:
        if cfg.heldout:  # the all-rows and both folds' systems in one solve, where it can
            _scores_together(ck, space, label, cfg, spectra)
        return _scores(ck, space, label, cfg, spectra=spectra)

    methods = list(cfg.methods)
    scores: Dict[str, Scores] = {}
    digests: Dict[str, str] = {}
    for label, (s, d) in zip(methods, spread(methods, one)):
        scores[label], digests[label] = s, d
    spread(methods, lambda m: _sweep(ck, space, m, scores[m], digests[m], cfg.ks, info.baseline,
                                     cfg.progress))  # fmt: skip
    if "gradient" in scores:
        for label in scores:
            if parse_method(label).method == "influence":
                _overlap(ck, scores, digests, label)
    for family, (parameter, members) in sensitivity.families(list(scores), cfg).items():
        _sensitivity(ck, family, parameter, members, scores, digests, cfg.location_ks)
    if cfg.fidelity_samples > 0:
        settings = {"data": ck.eval_settings, "dtype": cfg.fidelity_dtype}
        stage = ck.stage("fidelity", None, settings, ck.dev_inputs())
        run_fidelity(
            stage, ck.model, space, ck.dev, scores, cfg.fidelity_samples, cfg.fidelity_dtype,
            progress=cfg.progress, desc=f"{ck.name} fidelity",
        )  # fmt: skip
    spread(methods, lambda m: _location(ck, space, m, scores[m], digests[m], cfg.location_ks))
    if cfg.heldout:
        split, held = crossfit.run(ck, space, cfg, scores, digests,
                                   partial(_scores, ck, space, spectra=spectra))  # fmt: skip
        per_seed = [split_summary(split, held)]

        def other_split(seed: int) -> Dict[str, Any]:
            view = ck.view(Path("splits") / f"seed{seed}")
            # The random-k control and group fidelity stay on the main split.
            cfg_s = replace(cfg, split_seed=seed, group_subsets=0, random_draws=0)
            for label in cfg.methods:
                _scores_together(view, space, label, cfg_s, spectra, sets=("A", "B"))
            return split_summary(*crossfit.run(
                view, space, cfg_s, scores, digests, partial(_scores, view, space, spectra=spectra),
                reference=False,
            ))  # fmt: skip

        per_seed += spread(list(cfg.split_seeds), other_split)
        if cfg.split_seeds:
            _repeated_splits(ck, cfg, per_seed)
    if cfg.fresh_rows:
        _fresh(ck, space, cfg, scores, digests)


def _fresh(ck: Checkpoint, space: ParamSpace, cfg: AnalyzeConfig, scores: Dict[str, Scores],
           digests: Dict[str, str]) -> None:  # fmt: skip
    """The fresh test set: choices on dev (all-rows scores), measured on unused training rows."""
    examples, rows = unused_rows(cfg.data, ck.meta, cfg.fresh_rows, cfg.fresh_seed)
    fresh = DevRows(examples, ck.tok, cfg.eval_batch_size, cfg.max_length)
    settings = {"data": ck.eval_settings, "rows": cfg.fresh_rows, "draw_seed": cfg.fresh_seed,
                "ks": sorted(set(cfg.ks))}  # fmt: skip
    k_max = max(cfg.ks)
    fresh_digest = digest_batches(fresh.batches)

    def one(label: str) -> None:
        inputs = ck.dev_inputs(scores=digests[label], fresh=fresh_digest)
        stage = ck.stage("fresh", label, settings, inputs)
        run_fresh(stage, space, ck.model, ck.rows, fresh, rows, cfg.fresh_seed,
                  {label: scores[label].candidates(k_max)}, cfg.ks, cfg.progress)  # fmt: skip

    spread(list(scores), one)


def _repeated_splits(ck: Checkpoint, cfg: AnalyzeConfig, per_seed: List[Dict[str, Any]]) -> None:
    """``splits.json``: every split's numbers (derived from the held-out records, so it is
    rewritten on every run rather than resumed)."""
    seeds = [cfg.split_seed, *cfg.split_seeds]
    methods: Dict[str, List[Dict[str, Any]]] = {}
    for one in per_seed:
        for label, row in one.items():
            methods.setdefault(label, []).append(row)
    settings = {"data": ck.eval_settings, "seeds": seeds}
    stage = Stage(ck.out / "splits.json", "splits", settings, ck.dev_inputs(), ck.root, True)
    stage.save(RepeatedSplits(seeds, methods))


def _curvatures(cfg: AnalyzeConfig) -> List[str]:
    """The curvatures the run's influence methods solve with (the run's own if none)."""
    found = [cfg.score_config(m).curvature for m in cfg.methods
             if parse_method(m).method == "influence"]  # fmt: skip
    return sorted(set(found)) or [cfg.curvature]


def _spectrum(ck: Checkpoint, space: ParamSpace, curvature: str, cfg: AnalyzeConfig):
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
        cache_graphs=cfg.cache_graphs and cfg.hvp_mode == "double-backward",
    )  # fmt: skip
    log.info("%s: %s spectrum: %s", ck.name, curvature, spec.summary())
    return stage.save(spec).result


def _checkpoint_info(ck: Checkpoint, space: ParamSpace) -> CheckpointInfo:
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


def _with_spectrum(scfg: ScoreConfig, spectra: Optional[Dict[str, Any]]) -> ScoreConfig:
    """`scfg` with the spectrum stage's result for damping='auto' when it is what the solve's
    own Lanczos run would compute: same curvature, seed and tolerance, and converged within
    the solve's step cap (the same steps from the same start). Then the recorded λ is the
    one the solve would pick, and no product is spent on it."""
    spec = (spectra or {}).get(scfg.curvature)
    if scfg.damping != "auto" or spec is None or scfg.method != "influence":
        return scfg
    if scfg.solver not in ("cg", "minres", "lissa", "explicit"):
        return scfg
    info = spec.info or {}
    scale = max(abs(spec.lambda_min), abs(spec.lambda_max))
    converged = max(spec.lambda_min_error, spec.lambda_max_error) <= scfg.lanczos_tol * scale
    if (
        info.get("seed") != scfg.seed
        or info.get("tol") != scfg.lanczos_tol
        or len(spec.ritz_values) > scfg.lanczos_steps
        or not converged
    ):
        return scfg
    return replace(scfg, spectrum=spec)


def _score_stage(ck: Checkpoint, label: str, cfg: AnalyzeConfig,
                 half: Optional[Tuple[str, RowSplit]]):  # fmt: skip
    """(config, stage, file, validation batches, name) of method `label`'s scores."""
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
    return scfg, stage, ck.out / f"scores-{name}.safetensors", val, name


def _scores_together(ck: Checkpoint, space: ParamSpace, label: str, cfg: AnalyzeConfig,
                     spectra: Optional[Dict[str, Any]] = None,
                     sets: Sequence[str] = ("all", "A", "B")) -> None:  # fmt: skip
    """With held-out folds: the scores of all rows, fold A and fold B (`sets`) from one
    solve with several right-hand sides (one curvature product per iteration for all of
    them) when the method is a CG / MINRES influence, or from one EK-FAC fit, and two or
    more of them are not on disk yet; each is then recorded as `_scores` would record it."""
    scfg = cfg.score_config(label, ck.out)
    if scfg.method != "influence" or scfg.solver not in ("cg", "minres", "ekfac"):
        return
    split = crossfit._split(ck, cfg)
    halves = {k: v for k, v in {"all": None, "A": ("A", split), "B": ("B", split)}.items()
              if k in sets}  # fmt: skip
    missing = {}
    for key, half in halves.items():
        _, stage, file, val, _ = _score_stage(ck, label, cfg, half)
        if stage.previous() is None or not file.is_file():
            missing[key] = val
    if len(missing) < 2:
        return
    log.info("%s: scoring %s on %s in one solve", ck.name, label, ", ".join(missing))
    with _convergence_logged():
        got = score_with_config(ck.model, ck.train, missing, _with_spectrum(scfg, spectra),
                                params=space)  # fmt: skip
    for key, s in got.items():
        _scores(ck, space, label, cfg, half=halves[key], computed=s)


@contextmanager
def _convergence_logged():
    """A solve that stopped short is not a Python warning here: `_scores` logs its summary
    line at WARNING level and the record keeps its residual. Other warnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _scores(
    ck: Checkpoint, space: ParamSpace, label: str, cfg: AnalyzeConfig,
    half: Optional[Tuple[str, RowSplit]] = None, computed: Optional[Scores] = None,
    spectra: Optional[Dict[str, Any]] = None,
):  # fmt: skip
    """The scores of method `label` (a label such as 'influence-ggn') and their digest.

    With `half` = (name, split), the validation gradient comes from that half of
    the dev rows only (held-out protocol); the files are ``scores-<label>@<name>``.
    `computed`: scores already computed for these settings (saved unless on disk).
    `spectra`: the spectrum stage's results by curvature (damping='auto' takes λ from
    them when they are what its own Lanczos run would give).
    """
    scfg, stage, file, val, name = _score_stage(ck, label, cfg, half)
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
    if computed is None:
        log.info("%s: scoring with %s", ck.name, name)
        with _convergence_logged():
            s = score_with_config(ck.model, ck.train, val, _with_spectrum(scfg, spectra),
                                  params=space)  # fmt: skip
    else:
        s = computed
    s.save(file)
    digest = _digest(s)
    stage.save(_scores_info(name, file.name, digest, s))
    level = logging.WARNING if s.converged is False else logging.INFO
    log.log(level, "%s: %s: %s", ck.name, name, s.summary())
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


def _sensitivity(ck, family: str, parameter: str, members: List[Tuple[int, str]],
                 scores: Dict[str, Scores], digests: Dict[str, str], ks) -> Sensitivity:  # fmt: skip
    """Top-k overlap and relative change between each truncation and the next longer one."""
    ks = masking.check_ks(list(ks))
    inputs = {f"scores-{label}": digests[label] for _, label in members}
    stage = ck.stage("sensitivity", family, {"ks": ks, "parameter": parameter}, inputs)
    prev = stage.previous()
    if prev is not None:
        return prev.result
    pairs = []
    for (_, a), (_, b) in zip(members, members[1:]):
        pairs.append({"from": a, "to": b, **sensitivity.compare(scores[a], scores[b], ks)})
    rec = Sensitivity(family, parameter, [{"label": m, "setting": n} for n, m in members], pairs)
    return stage.save(rec).result


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
