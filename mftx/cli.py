"""The `mftx` command: finetune, analyze, report, demo, selfcheck.

Every command logs to a file in its output directory, shows progress bars on
long loops and exits non-zero with a one-line reason on error (``--debug``
prints the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

__all__ = ["main"]

log = logging.getLogger("mftx")


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> List[int]:
    try:
        return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _words(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "all") else int(text)


def _damping(text: str) -> Union[float, str]:
    """A number, or 'auto' (λ from the estimated spectrum)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


class _RelativeFormatter(logging.Formatter):
    """Log lines with absolute paths made relative to the log's directory."""

    def __init__(self, fmt: str, root: Path) -> None:
        super().__init__(fmt)
        self.root = root

    def format(self, record: logging.LogRecord) -> str:
        from .fileio import relativize_text

        return relativize_text(super().format(record), self.root)


def _setup_logging(out: Path, name: str, args: argparse.Namespace) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.log"
    root = logging.getLogger("mftx")
    root.setLevel(logging.DEBUG)
    _close_logging()
    fh = logging.FileHandler(path)
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(_RelativeFormatter("%(asctime)s %(levelname)s %(message)s", out))
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if args.verbose else logging.WARNING)
    sh.setFormatter(logging.Formatter("mftx: %(message)s"))
    root.addHandler(fh)
    root.addHandler(sh)
    root.propagate = False
    log.info("%s", args.command_line)
    return path


def _close_logging() -> None:
    root = logging.getLogger("mftx")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = True


# ---------------------------------------------------------------- commands


def cmd_finetune(args: argparse.Namespace) -> int:
    from .study.finetune import FinetuneConfig, describe_finetune, finetune

    cfg = FinetuneConfig(
        model=args.model, data=args.data, train_size=args.train_size, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        max_length=args.max_length, targets=args.targets, eval_every=args.eval_every,
        seed=args.seed, prefix=args.prefix, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        state_every=args.state_every, progress=not args.no_progress,
    )  # fmt: skip
    _setup_logging(Path(args.out), "finetune", args)
    summary = finetune(cfg, Path(args.out), force=args.force)
    print(describe_finetune(summary))
    return 0


def _analyze_config(args: argparse.Namespace):
    from .study.config import AnalyzeConfig

    return AnalyzeConfig(
        data=args.data, train_size=args.train_size, seed=args.seed, methods=args.methods,
        ks=args.ks, batch_size=args.batch_size, lr=args.lr, damping=args.damping,
        curvature=args.curvature, solver=args.solver, rank=args.rank, fisher=args.fisher,
        max_iter=args.max_iter, tol=args.tol,
        hvp_batches=args.hvp_batches, hvp_mode=args.hvp_mode,
        cache_graphs=not args.no_cache_graphs, fidelity_samples=args.fidelity_samples,
        fidelity_dtype=args.fidelity_dtype, heldout=args.heldout, split_seed=args.split_seed,
        split_seeds=args.split_seeds,
        random_draws=args.random_draws, fresh_rows=args.fresh_rows, fresh_seed=args.fresh_seed,
        group_subsets=args.group_subsets, group_ks=args.group_ks,
        group_flagged=args.group_flagged, group_quadratic=args.group_quadratic,
        location_ks=args.location_ks, spectrum_steps=args.spectrum_steps,
        spectrum_probes=args.spectrum_probes, progress=not args.no_progress,
    )  # fmt: skip


def _expand_checkpoints(paths: Sequence[str]) -> List[Path]:
    from .study.finetune import checkpoints_of

    out: List[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if (path / "finetune.json").is_file() and not (path / "config.json").is_file():
            found = checkpoints_of(path)
            if not found:
                raise ValueError(f"{path}: the fine-tuning run saved no checkpoint")
            out.extend(found)
        else:
            out.append(path)
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from .study import parallel
    from .study.analysis import analyze
    from .study.report import format_tables, load_run

    cfg = _analyze_config(args)
    cfg.validate()
    ckpts = _expand_checkpoints(args.checkpoints)
    split = parallel.from_env()  # torchrun ... -m mftx analyze: stages spread over ranks
    name = "analyze" if split is None or split.writer else f"analyze.rank{split.rank}"
    _setup_logging(Path(args.out), name, args)
    try:
        analyze(ckpts, cfg, Path(args.out), force=args.force, command=args.command_args)
    finally:
        parallel.reset()
    if split is None or split.writer:
        print(format_tables(load_run(Path(args.out))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .study.report import format_tables, load, write_report

    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(format_tables(load(Path(args.run_dir))))
    print(f"\nreport written to {path}")
    return 0


#: The demo's methods: the library's default influence solver and the first-order rule.
DEMO_METHODS = ("influence-ekfac", "gradient")


def _describe_method(label: str, run_solver: str = "minres") -> str:
    """One phrase per method label, from what the label parses to (nothing hard-coded)."""
    from .scores import METHODS
    from .scoring import DEFAULT_SOLVER
    from .study.config import parse_method

    v = parse_method(label)
    formula = METHODS[v.method]["help"].split(":")[0]
    if v.method != "influence":
        return f"{label} ({formula})"
    if v.solver == "ekfac":
        formula = formula.replace("(H + λI)", "(F + λI)") + ", F the EK-FAC Fisher"
    text = f"{label} ({formula}; solver {v.solver or run_solver}"
    if (v.solver or run_solver) == DEFAULT_SOLVER:
        text += ", the library's default"
    return text + ")"


def cmd_demo(args: argparse.Namespace) -> int:
    from .study.analysis import analyze
    from .study.config import AnalyzeConfig, parse_method
    from .study.finetune import FinetuneConfig, checkpoints_of, describe_finetune, finetune
    from .study.report import format_tables, load_run, write_report
    from .study.report.headline import headline

    out = Path(args.out)
    _setup_logging(out, "demo", args)
    t0 = time.perf_counter()
    methods = list(args.methods)
    cfg = AnalyzeConfig(
        data=args.data, train_size=args.train_size, methods=methods, ks=args.ks,
        batch_size=args.batch_size, lr=args.lr,
        hvp_batches=args.hvp_batches, fidelity_samples=0, heldout=True,
        random_draws=args.random_draws, fresh_rows=args.fresh_rows, fresh_seed=args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    cfg.validate()
    described = "; ".join(_describe_method(m, cfg.solver) for m in methods)
    solvers = {
        parse_method(m).solver or cfg.solver for m in methods
        if parse_method(m).method in ("influence", "obd")
    }  # fmt: skip
    products = ""
    if solvers - {"ekfac"}:
        products = f" Curvature products on {args.hvp_batches} training batches."
    print(
        f"mftx demo: fine-tune {args.model} on {args.train_size:,} SST-2 rows (batch "
        f"{args.batch_size}, lr {args.lr:g}, at most {args.epochs} epochs, dev accuracy every "
        f"{args.eval_every} steps) until dev accuracy reaches {args.target:.0%}; then score "
        f"with {described}, mask the top k for k in "
        f"{', '.join(f'{k:,}' for k in args.ks)} (k = 0, no masking, also a candidate where k "
        "is chosen on other rows), and measure under three protocols: reference (chosen and "
        "measured on all dev rows), held-out (chosen on one seeded half of dev, measured on "
        f"the other, both ways) and {args.fresh_rows:,} fresh rows (SST-2 training rows the "
        "checkpoint never saw, all choices made on dev). Controls: one logit offset chosen on "
        f"the choosing rows (recalibration) and {args.random_draws} draws of k random "
        f"parameters.{products} The full study: docs/results/reproduce.sh."
    )
    ft = FinetuneConfig(
        model=args.model, data=args.data, train_size=args.train_size,
        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, targets=[args.target],
        eval_every=args.eval_every, seed=args.seed, prefix="demo",
        progress=not args.no_progress,
    )  # fmt: skip
    summary = finetune(ft, out / "finetune", force=args.force)
    print(describe_finetune(summary))
    ckpts = checkpoints_of(out / "finetune")
    if not ckpts:
        print("the accuracy target was not reached: nothing to analyse")
        return 1
    analyze(ckpts, cfg, out / "analysis", force=args.force, command=args.command_args)
    path = write_report(out / "analysis")
    run = load_run(out / "analysis")
    print(format_tables(run))
    print("\n## Summary\n")
    print("\n".join(headline(run)))
    print(f"\nreport: {path}  ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from . import fileio
    from .curvature.diagnose import diagnose
    from .data import load_sst2
    from .models import load_classifier, read_metadata

    path = Path(args.checkpoint)
    meta = read_metadata(path) if (path / "mftx.json").is_file() else {}
    seed = args.seed if args.seed is not None else int(meta.get("seed", 0))
    model, tok = load_classifier(args.checkpoint)
    data = load_sst2(args.data, args.train_size, seed, tokenizer=tok, max_length=args.max_length)
    train = data.train_batches(args.batch_size, shuffle=True, seed=seed)
    d = diagnose(
        model, train, curvature=args.curvature, damping=args.damping, steps=args.steps,
        hvp_batches=args.hvp_batches, seed=seed, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{path.name}: {len(train)} training batches of {args.batch_size}, "
          f"HVPs on {d.spectrum.info.get('hvp_batches')}")  # fmt: skip
    print(d.report())
    if args.json:
        fileio.write_json(Path(args.json), d.to_json(), root=Path(args.json).parent)
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from .ops.selfcheck import run

    return run(size=args.size)


# ---------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages to stderr")
    p.add_argument("--debug", action="store_true", help="print tracebacks on error")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default=os.environ.get("MFTX_DATA"),
        help="directory with SST-2 train.tsv and dev.tsv (default: $MFTX_DATA, else the hub)",
    )  # fmt: skip
    p.add_argument(
        "--train-size", type=_optional_int, default=1000, help="training rows ('all': every row)"
    )


def build_parser() -> argparse.ArgumentParser:
    from .inverse.solvers import SOLVERS
    from .study.config import DEFAULT_GROUP_KS, DEFAULT_KS, DEFAULT_LOCATION_KS
    from .study.finetune import DEFAULT_TARGETS

    parser = argparse.ArgumentParser(
        prog="mftx", description="Mask fine-tuning of transformer classifiers.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser
    sub.add_parser = lambda *a, **kw: add(*a, allow_abbrev=False, **kw)  # type: ignore[method-assign]

    p = sub.add_parser("finetune", help="fine-tune and save a checkpoint per accuracy target")
    p.add_argument("--model", default="minilm", help="model name or path ('minilm': embedded)")
    _data_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=6, help="maximum epochs")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--targets", type=_floats, default=list(DEFAULT_TARGETS), help="dev-accuracy targets"
    )
    p.add_argument("--eval-every", type=int, default=4, help="evaluate every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="ckpt", help="checkpoint names: PREFIX-<target %%>")
    p.add_argument(
        "--schedule", choices=["constant", "linear"], default="constant",
        help="learning rate: constant, or linear warmup then linear decay to 0",
    )  # fmt: skip
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of steps warming up")
    p.add_argument(
        "--state-every", type=int, default=0, metavar="N",
        help="save the training state every N steps (at an evaluation) so that an interrupted "
        "run resumes there; 0: never",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="fine-tune again over a completed run")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("analyze", help="score, mask and compare methods on checkpoints")
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoint directories or a finetune --out directory"
    )
    _data_args(p)
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the checkpoint's)")
    p.add_argument("--methods", type=_words, default=["gradient", "influence"])
    p.add_argument("--ks", type=_ints, default=list(DEFAULT_KS), help="top-k grid")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5, help="lr of the gradient rule")
    p.add_argument(
        "--damping", type=_damping, default=0.01,
        help="λ of (H + λI), or 'auto': from the estimated spectrum (H + λI positive definite)",
    )  # fmt: skip
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument(
        "--solver", choices=list(SOLVERS), default="minres",
        help="minres (default: (H + λI) s = g as written, indefinite or not) | cg | lissa | "
        "explicit | lanczos (low-rank inverse of --rank eigenpairs) | ekfac (Kronecker-factored "
        "Fisher)",
    )  # fmt: skip
    p.add_argument("--rank", type=int, default=20, help="--solver lanczos: eigenpairs kept")
    p.add_argument(
        "--fisher", choices=["sampled", "empirical"], default="sampled",
        help="--solver ekfac: labels sampled from the model, or the training labels",
    )  # fmt: skip
    p.add_argument("--max-iter", type=int, default=100, help="CG / MINRES iteration cap")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument(
        "--hvp-batches", type=_optional_int, default=None, help="training batches for HVPs"
    )
    p.add_argument(
        "--hvp-mode", choices=["rev-rev", "fwd-rev", "double-backward"], default="double-backward"
    )
    p.add_argument("--no-cache-graphs", action="store_true", help="recompute first-order graphs")
    p.add_argument("--fidelity-samples", type=int, default=500)
    p.add_argument("--fidelity-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--heldout", action="store_true",
        help="also the held-out protocol: scores and best k from one seeded half of dev, "
        "accuracy on the other (both ways), with the recalibration control",
    )  # fmt: skip
    p.add_argument("--split-seed", type=int, default=0, help="seed of the two-fold dev split")
    p.add_argument(
        "--split-seeds", type=_ints, default=[],
        help="further split seeds: the held-out protocol repeated on each (repeated cross-fitting)",
    )  # fmt: skip
    p.add_argument("--random-draws", type=int, default=0, help="random-k control draws")
    p.add_argument(
        "--fresh-rows", type=int, default=0,
        help="fresh test set: this many SST-2 training rows the checkpoint was not fine-tuned "
        "on; choices made on dev are measured there once (0: none)",
    )  # fmt: skip
    p.add_argument("--fresh-seed", type=int, default=0, help="seed of the fresh rows' draw")
    p.add_argument(
        "--group-subsets", type=int, default=0, help="group fidelity: random subsets per k"
    )
    p.add_argument("--group-ks", type=_ints, default=list(DEFAULT_GROUP_KS), help="group sizes")
    p.add_argument(
        "--group-flagged", type=int, default=10, help="subsets of each flagged set per k"
    )
    p.add_argument(
        "--group-quadratic", type=int, default=0,
        help="random subsets per k that also get the second-order group term (one HVP each)",
    )  # fmt: skip
    p.add_argument("--location-ks", type=_ints, default=list(DEFAULT_LOCATION_KS),
                   help="top-k sets located by layer and module kind")  # fmt: skip
    p.add_argument(
        "--spectrum-steps", type=int, default=0,
        help="Lanczos steps of the curvature spectrum per checkpoint (0: none)",
    )  # fmt: skip
    p.add_argument("--spectrum-probes", type=int, default=3,
                   help="spectrum: Lanczos runs for the density")  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument(
        "--force", action="store_true",
        help="recompute every stage, even results on disk computed with the same settings "
        "(without it: reuse those, compute what is missing, refuse other settings)",
    )  # fmt: skip
    _common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="tables, CSV/JSON and plots of an analysis run")
    p.add_argument("run_dir", help="an analysis --out directory, or a report's results.json")
    p.add_argument("--out", default=None, help="default: RUN_DIR/report (results.json: its dir)")
    _common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        help="the study in small on the embedded model: fine-tune to 60 %%, score, mask, and "
        "measure in-sample, held out and on fresh rows, with controls and intervals",
    )  # fmt: skip
    p.add_argument("--data", default=os.environ.get("MFTX_DATA"))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="minilm", help="model name or path (minilm: embedded)")
    p.add_argument("--methods", type=_words, default=list(DEMO_METHODS),
                   help="method labels (default: the default influence solver and the "
                   "gradient rule)")  # fmt: skip
    p.add_argument("--train-size", type=int, default=1000, help="fine-tuning rows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--target", type=float, default=0.60, help="dev accuracy to stop at")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", type=_ints, default=[100, 1000, 5000, 10000, 100000])
    p.add_argument("--hvp-batches", type=int, default=4)
    p.add_argument("--random-draws", type=int, default=3, help="random-k control draws")
    p.add_argument("--fresh-rows", type=int, default=1000, help="fresh test rows")
    p.add_argument("--force", action="store_true", help="recompute everything")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "diagnose",
        help="before a solve: is (C + λI) well posed at this damping? (Lanczos on the curvature)",
    )
    p.add_argument("checkpoint", help="a checkpoint directory (or a Hugging Face model name)")
    _data_args(p)
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--hvp-batches", type=_optional_int, default=4,
                   help="training batches for the curvature products ('all': every batch)")  # fmt: skip
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument("--damping", type=float, default=0.01, help="the λ to check")
    p.add_argument("--steps", type=int, default=20, help="Lanczos steps (curvature products)")
    p.add_argument("--json", default=None, help="also write the diagnosis as JSON here")
    _common(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("selfcheck", help="run every op on both paths and print timings")
    p.add_argument("--size", type=int, default=4_000_000, help="number of scores")
    _common(p)
    p.set_defaults(func=cmd_selfcheck)
    return parser


#: Options whose value is a path (recorded relative to the output directory).
PATH_OPTIONS = ("--data", "--out", "--json")


def command_args(argv: Sequence[str], cwd: Optional[Path] = None) -> List[Union[str, Path]]:
    """``mftx`` and `argv`, with path arguments as absolute `Path` objects.

    Paths are the positional arguments (checkpoint and run directories), the
    values of `PATH_OPTIONS`, and a ``--model`` value that names a directory;
    relative ones are taken relative to `cwd` (default: the working directory).
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = list(argv[:1])
    options = sub.choices[argv[0]]._option_string_actions if argv else {}
    out: List[Union[str, Path]] = ["mftx", *command]
    pending: Optional[str] = None
    for token in argv[1:]:
        if pending is not None:
            is_path = pending in PATH_OPTIONS or (pending == "--model" and (base / token).is_dir())
            out.append(base / token if is_path else token)
            pending = None
        elif token.startswith("--") and "=" in token:
            opt, _, value = token.partition("=")
            out += [opt, base / value if opt in PATH_OPTIONS else value]
        elif token in options:
            out.append(token)
            pending = token if options[token].nargs != 0 else None
        else:
            out.append(base / token)  # every positional argument of mftx is a path
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = "mftx " + " ".join(shlex.quote(a) for a in argv)
    args.command_args = command_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mftx: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"mftx {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        _close_logging()


if __name__ == "__main__":
    sys.exit(main())
