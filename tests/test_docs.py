"""The README and the documentation site say what the code does.

- Every ``python`` block of the README and of ``docs/*.md`` runs as written (the blocks of
  one page in order, in one namespace, in a temporary directory; ``../shared/data/sst2``
  is replaced by ``$MFTX_DATA``), and what it prints is checked.
- Every ``mftx`` command in a ``bash`` block passes only options its parser knows; every
  script, test file and make target a command names exists, and so does every repository
  path named in backticks.
- The site builds with ``mkdocs build --strict`` (broken links, anchors and references
  fail it), and its API reference documents every public object exactly once.

The study's tables on these pages are checked against docs/results in tests/test_report.py.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import types
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from test_layout import resolve

import mftx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = Path(os.environ.get("MFTX_DATA", ROOT.parent / "shared" / "data" / "sst2"))
DATA_IN_DOCS = "../shared/data/sst2"

#: The pages whose code is checked: the README and the site's own pages (docs/results is the
#: study's generated output, checked by tests/test_report.py).
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("reference/*.md"))]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path, lang: str) -> List[str]:
    """The fenced code blocks of `page` in language `lang`, in order."""
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
    return [m.group(2) for m in fence.finditer(page.read_text()) if m.group(1) == lang]


def test_pages_are_found():
    names = {page_id(p) for p in PAGES}
    assert {"README.md", "docs/guide.md", "docs/solvers.md", "docs/cli.md"} <= names
    assert not any(n.startswith("docs/results/") for n in names)
    # The block reader sees every fence: the tour, the Trainer example and the solvers' one.
    assert len(blocks(DOCS / "guide.md", "python")) == 2
    assert blocks(ROOT / "README.md", "bash") and blocks(ROOT / "README.md", "python")


# ------------------------------------------------------------------ python blocks


def _accuracy_lines(out: str) -> List[str]:
    return [ln for ln in out.splitlines() if ln.startswith("{'accuracy'")]


def _readme(out: str, tmp: Path) -> None:
    lines = out.splitlines()
    assert len(_accuracy_lines(out)) == 1 and "'n': 872" in _accuracy_lines(out)[0]
    # the default: EK-FAC, a closed form, no warning (pytest turns warnings into errors)
    assert lines[-1].startswith("influence: EK-FAC of the sampled Fisher over 36 linear modules, ")
    assert "λ = 0.01, closed form (no curvature products)" in lines[-1]


def _guide(out: str, tmp: Path) -> None:
    assert "'analysed': 10637568" in out
    assert re.search(r"^\d+ True$", out, re.M)  # CG on the GGN converged
    assert (tmp / "scores.safetensors").is_file()
    # The evaluation with 5,000 parameters masked differs from the one after restoring.
    acc = _accuracy_lines(out)
    assert len(acc) == 2 and acc[0] != acc[1]
    assert out.splitlines()[-2:] == ["['score.weight']", "True 4"]  # the Trainer example


def _solvers(out: str, tmp: Path) -> None:
    assert (tmp / "spectrum.json").is_file() and (tmp / "eig.safetensors").is_file()
    assert mftx.Spectrum.load(tmp / "spectrum.json").n_matvec > 0
    assert out.splitlines()[-1] == "True 0"  # EK-FAC: no curvature products


def _distributed(out: str, tmp: Path) -> None:
    # Alone (a one-process group): the union's counts, and every row held.
    assert out.splitlines()[-2:] == ["3 12", "75 of 75"]
    assert (tmp / "scores.safetensors").is_file()


#: What a page's code must print, beyond running without an error or a warning.
EXPECT: Dict[str, Callable[[str, Path], None]] = {
    "README.md": _readme,
    "docs/guide.md": _guide,
    "docs/solvers.md": _solvers,
    "docs/distributed.md": _distributed,
}
CODE_PAGES = [p for p in PAGES if blocks(p, "python")]


def test_the_examples_are_checked():
    assert set(EXPECT) <= {page_id(p) for p in CODE_PAGES}
    assert {"README.md", "docs/guide.md", "docs/solvers.md"} <= set(EXPECT)


@pytest.mark.parametrize("page", CODE_PAGES, ids=page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    code = "\n".join(blocks(page, "python"))
    if DATA_IN_DOCS in code and not (DATA / "train.tsv").is_file():
        pytest.skip(f"no SST-2 at {DATA}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = code.replace(repr(DATA_IN_DOCS).replace("'", '"'), repr(str(DATA)))
    exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    if page_id(page) in EXPECT:
        EXPECT[page_id(page)](out, tmp_path)


# ------------------------------------------------------------------ shell blocks and paths


def _subcommand_options() -> Dict[str, set]:
    from mftx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def _make_targets() -> set:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


def shell_commands(page: Path) -> List[List[str]]:
    """The commands of `page`'s bash blocks as token lists (continuations joined, comments,
    environment assignments and `&&` / `|` / `;` splits handled)."""
    out = []
    for block in blocks(page, "bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in re.split(r"&&|\|\||[|;]", line.split(" #", 1)[0]):
                tokens = shlex.split(part)
                while tokens and re.match(r"^\w+=", tokens[0]):
                    tokens.pop(0)
                if tokens:
                    out.append(tokens)
    return out


def check_command(tokens: List[str], options: Dict[str, set], targets: set) -> List[str]:
    """What is wrong with one shell command of the docs (empty: nothing)."""
    prog, args = Path(tokens[0]).name, tokens[1:]
    if prog == "mftx":
        if not args or args[0] not in options:
            return [f"unknown subcommand in {tokens}"]
        known = options[args[0]]
        return [f"mftx {args[0]}: unknown option {a}" for a in args[1:]
                if a.startswith("-") and a.split("=", 1)[0] not in known]  # fmt: skip
    if prog == "make":
        return [f"no make target {a}" for a in args if not a.startswith("-") and a not in targets]
    if prog.startswith("python") or prog == "bash":
        files = [a for a in args if re.search(r"\.(py|sh)$", a) and "/" in a]
        files += args[:1] if prog == "bash" else []
        return [f"no file {f}" for f in files if not (ROOT / f).is_file()]
    return []


def test_check_command_catches_drift():
    options = {"analyze": {"--out", "--heldout"}}
    assert check_command(["mftx", "analyze", "run", "--out", "x"], options, set()) == []
    assert check_command(["mftx", "analyze", "--held-out"], options, set())
    assert check_command(["mftx", "analyse"], options, set())
    assert check_command(["make", "docs"], options, {"test"})
    assert check_command(["python", "benchmarks/no_such_bench.py"], options, set())
    assert check_command(["bash", ".ci/no_such_script"], options, set())
    assert check_command(["bash", ".ci/run"], options, set()) == []
    assert check_command(["python", "benchmarks/bench_hvp.py", "x.json"], options, set()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shell_commands_are_real(page):
    options, targets = _subcommand_options(), _make_targets()
    problems = [p for cmd in shell_commands(page) for p in check_command(cmd, options, targets)]
    assert not problems, problems


#: Repository paths as the pages write them in backticks (placeholders like `<ckpt>` aside).
REPO_PATH = re.compile(r"`((?:benchmarks|tests|docs|mftx|csrc|\.ci)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_paths_exist(page):
    named = set(REPO_PATH.findall(page.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_readme_links_exist():
    """The README's relative links (to the docs pages and figures) point at files."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [x for x in links if "://" not in x]
    assert len(local) >= 8 and "docs/solvers.md" in local
    missing = [x for x in local if not (ROOT / x).exists()]
    assert not missing, missing


# ------------------------------------------------------------------ the site


def _cli_help():
    spec = importlib.util.spec_from_file_location("cli_help", DOCS / "_ext" / "cli_help.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_has_every_subcommand():
    mod = _cli_help()
    assert mod.MARKER in (DOCS / "cli.md").read_text()
    text = mod.reference()
    for name, opts in _subcommand_options().items():
        assert f"### mftx {name}\n" in text
        assert all(o in text for o in opts), name
    page = mod.on_page_markdown("a\n" + mod.MARKER + "\nb")
    assert page.startswith("a\n### mftx ") and page.endswith("\nb")


def inventory(site: Path) -> List[Tuple[str, str, int]]:
    """(name, role, priority) of each entry of a built site's objects.inv (Sphinx format:
    four header lines, then zlib-compressed `name domain:role priority uri dispname` lines)."""
    raw = (site / "objects.inv").read_bytes().split(b"\n", 4)[4]
    out = []
    for line in zlib.decompress(raw).decode().splitlines():
        name, role, priority = line.split(" ", 3)[:3]
        out.append((name, role, int(priority)))
    return out


#: Modules whose `__all__` the reference documents, beside `mftx.__all__`.
DOCUMENTED_MODULES = ["mftx.ops", "mftx.ops.reference", "mftx.data", "mftx.models",
                      "mftx.evaluate", "mftx.lanczos", "mftx.spectra", "mftx.memory",
                      "mftx.ekfac", "mftx.lowrank"]  # fmt: skip
#: The study's command-line configs.
CONFIGS = ["mftx.study.finetune.FinetuneConfig", "mftx.study.config.AnalyzeConfig"]


def public_names() -> List[str]:
    names = [f"mftx.{n}" for n in mftx.__all__]
    for mod in DOCUMENTED_MODULES:
        names += [f"{mod}.{n}" for n in resolve(mod).__all__]
    return names + CONFIGS


def reference_problems(entries: List[Tuple[str, str, int]]) -> List[str]:
    """Public names the inventory's rendered objects miss, and objects rendered twice."""
    roles = ("py:module", "py:class", "py:function", "py:method", "py:data")
    rendered = [name for name, role, priority in entries if priority == 1 and role in roles]
    by_object: Dict[int, List[str]] = {}
    for name in rendered:
        obj = resolve(name)
        if isinstance(obj, (types.FunctionType, type, types.ModuleType)):
            by_object.setdefault(id(obj), []).append(name)
    problems = [f"documented twice: {v}" for v in by_object.values() if len(v) > 1]
    for name in public_names():
        obj = resolve(name)
        if name not in rendered and id(obj) not in by_object:
            problems.append(f"not documented: {name}")
    return problems


def test_reference_check_catches_gaps_and_twins():
    entries = [("mftx.score", "py:function", 1), ("mftx.scoring.score", "py:function", 1)]
    problems = reference_problems(entries)
    assert "documented twice: ['mftx.score', 'mftx.scoring.score']" in problems
    assert "not documented: mftx.Scores" in problems


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make docs)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_site_builds_strictly_with_every_page(site):
    for page in PAGES[1:]:
        rel = page.relative_to(DOCS).with_suffix("")
        built = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert built.is_file(), rel
    assert (site / "results" / "report" / "index.html").is_file()


def test_reference_documents_every_public_object_once(site):
    assert reference_problems(inventory(site)) == []


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_reference_shows_config_help_and_cli_options(site):
    from dataclasses import fields

    from mftx.study.config import AnalyzeConfig

    api = _text(site / "reference" / "api" / "index.html")
    study = _text(site / "reference" / "study" / "index.html")
    for cls, text in ((mftx.ScoreConfig, api), (AnalyzeConfig, study)):
        for f in fields(cls):
            assert f.metadata["help"] in text, (cls.__name__, f.name)
    assert "help_field(" not in api + study  # defaults shown as values, not as the call
    cli = _text(site / "cli" / "index.html")
    assert "usage: mftx analyze" in cli and "--heldout" in cli
