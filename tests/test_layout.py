"""The package's layout: imports run one way (CLI → study → library → ops/io), no circles,
and every public name the README and the docs pages document keeps working.

The import graph is read from the source with `ast`: every ``import`` and ``from … import``
anywhere in a module counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike, so an arrow cannot be hidden by moving it into a function.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import mftx

PKG = Path(mftx.__file__).resolve().parent
ROOT = Path(__file__).resolve().parents[1]
#: The README and the documentation site's pages (docs/results is generated output).
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "docs").glob("reference/*.md"))]  # fmt: skip

#: Layers, bottom first. A module belongs to the longest prefix listed that it starts with
#: (``mftx`` itself: the public API and the modules beside it); it may import modules of its
#: own layer or of lower ones.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("ops and files", ("mftx._version", "mftx._config", "mftx.errors", "mftx.fileio", "mftx.ops")),
    ("core", ("mftx.core",)),
    ("curvature", ("mftx.curvature",)),
    ("inverses and backends", ("mftx.inverse", "mftx.backends")),
    ("public API", ("mftx",)),
    ("study", ("mftx.study",)),
    ("command line", ("mftx.cli", "mftx.__main__")),
]
LIBRARY_PACKAGES = ("mftx", "mftx.core", "mftx.curvature", "mftx.inverse", "mftx.backends",
                    "mftx.ops")  # fmt: skip
STUDY = ("mftx.study", "mftx.cli", "mftx.__main__")


def modules_of(root: Path, package: str) -> Dict[str, Path]:
    """Module name -> file, for every ``.py`` (and compiled module's ``.pyi`` stub) under `root`."""
    mods: Dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods.setdefault(name, path)
    return mods


def import_graph(root: Path, package: str = "mftx") -> Dict[str, Set[str]]:
    """Module -> the modules of `package` it imports (anywhere in its source)."""
    mods = modules_of(root, package)
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        if path.suffix == ".pyi":
            graph[name] = set()
            continue
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            for t in targets:
                while t and t not in mods and "." in t:  # import a.b.c of a module a.b
                    t = t.rpartition(".")[0]
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    best, layer = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer >= 0, f"{module} is in no layer: add it to LAYERS"
    return layer


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import of a higher layer, as 'a (layer) imports b (layer)'."""
    return [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, deps in sorted(graph.items())
        for b in sorted(deps)
        if layer_of(b) > layer_of(a)
    ]


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --------------------------------------------------------------------------- the checks


def test_no_import_circles():
    assert cycles(import_graph(PKG)) == []


def test_imports_run_one_way():
    assert upward_imports(import_graph(PKG)) == []


def test_every_module_has_a_layer_and_each_layer_has_modules():
    graph = import_graph(PKG)
    used = {layer_of(m) for m in graph}
    assert used == set(range(len(LAYERS))), [LAYERS[i][0] for i in set(range(len(LAYERS))) - used]


def test_packages_say_their_job_and_what_they_may_import():
    for pkg in ("mftx.core", "mftx.curvature", "mftx.inverse", "mftx.backends", "mftx.ops",
                "mftx.study"):  # fmt: skip
        doc = importlib.import_module(pkg).__doc__ or ""
        assert "May import" in doc, f"{pkg}/__init__.py's docstring names no allowed imports"


def test_the_library_loads_no_study_module():
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {list(LIBRARY_PACKAGES)!r}:
            importlib.import_module(name)
        import mftx.inverse, mftx.scoring, mftx.data, mftx.models, mftx.evaluate
        print(sorted(m for m in sys.modules if m.startswith({STUDY!r})))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- the checker itself


def _write_package(tmp_path: Path, files: Dict[str, str]) -> Path:
    root = tmp_path / "mftx"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return root


def test_graph_sees_hidden_imports_and_finds_their_circle(tmp_path):
    """An arrow under TYPE_CHECKING or inside a function is still an arrow."""
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "study/__init__.py": "",
            "study/analysis.py": "from . import crossfit\n",
            "study/crossfit.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from .analysis import Config
                def f():
                    from ..inverse.solvers import cg
                """,
            "inverse/__init__.py": "",
            "inverse/solvers.py": "def g():\n    import mftx.study.analysis\n",
        },
    )
    graph = import_graph(root)
    assert graph["mftx.study.crossfit"] == {"mftx.study.analysis", "mftx.inverse.solvers"}
    assert graph["mftx.inverse.solvers"] == {"mftx.study.analysis"}
    assert cycles(graph) == [["mftx.inverse.solvers", "mftx.study.analysis", "mftx.study.crossfit"]]
    assert upward_imports(graph) == [
        "mftx.inverse.solvers (inverses and backends) imports mftx.study.analysis (study)"
    ]


def test_graph_resolves_submodule_imports_and_stubs(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "from .ops import topk\nfrom .curvature import hvp\n",
            "ops/__init__.py": "from . import _C\ndef topk(): ...\n",
            "ops/_C.pyi": "def f() -> None: ...\n",
            "curvature/__init__.py": "",
            "curvature/hvp.py": "from ..core.params import ParamSpace\nimport mftx.ops.reference\n",
            "ops/reference.py": "",
            "core/__init__.py": "",
            "core/params.py": "",
        },
    )
    graph = import_graph(root)
    assert graph["mftx"] == {"mftx.ops", "mftx.curvature.hvp"}
    assert graph["mftx.ops"] == {"mftx.ops._C"}
    assert graph["mftx.curvature.hvp"] == {"mftx.core.params", "mftx.ops.reference"}
    assert cycles(graph) == [] and upward_imports(graph) == []


# --------------------------------------------------------------------------- the public API

#: Names documented before the package was laid out by concept; they keep working.
EARLIER_NAMES = [
    "mftx.score", "mftx.spectrum", "mftx.ScoreConfig", "mftx.ScoreConfig.help",
    "mftx.LowRankInverse", "mftx.LowRankInverse.load", "mftx.Spectrum", "mftx.Spectrum.load",
    "mftx.select_params", "mftx.masked", "mftx.MaskStack", "mftx.Scores", "mftx.METHODS",
    "mftx.DEFAULT_EXCLUDE", "mftx.Curvature", "mftx.Objective", "mftx.HFClassification",
    "mftx.ParamSpace", "mftx.Candidates", "mftx.SolveResult", "mftx.__version__",
    "mftx.NegativeCurvatureError", "mftx.NonFiniteError", "mftx.SolverDivergedError",
    "mftx.ops.topk", "mftx.ops.select", "mftx.ops.toward_zero", "mftx.ops.mask_",
    "mftx.ops.restore_", "mftx.ops.reference", "mftx.ops.HAS_CPP", "mftx.ops.set_num_threads",
    "mftx.data.load_sst2", "mftx.data.make_batches", "mftx.models.load_classifier",
    "mftx.models.make_tiny_classifier", "mftx.evaluate.evaluate", "mftx.spectra.plot_density",
    "mftx.memory.saved_bytes", "mftx.lanczos.lanczos", "mftx.ekfac", "mftx.lowrank",
]  # fmt: skip

#: Strings of the README that look like names but are files.
NOT_NAMES = {"mftx.json"}


def _readme_names() -> List[str]:
    text = "\n".join(page.read_text() for page in DOC_PAGES)
    names = set(re.findall(r"\bmftx(?:\.[A-Za-z_]\w*)+", text))
    for mod, items in re.findall(r"^\s*from (mftx[\w.]*) import ([\w, ]+)$", text, re.M):
        names.update(f"{mod}.{item.strip()}" for item in items.split(","))
    return sorted(names - NOT_NAMES)


def resolve(name: str):
    """Import the longest module prefix of `name`, then read the rest as attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("name", sorted(set(EARLIER_NAMES) | set(_readme_names())))
def test_documented_name_works(name):
    assert resolve(name) is not None


def test_resolve_fails_on_a_missing_name():
    with pytest.raises(AttributeError):
        resolve("mftx.score_everything")
    with pytest.raises(AttributeError):
        resolve("mftx.ops.no_such_op")
