# Development entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv (torch pinned first: an unpinned torch pulls a multi-GB CUDA
# build), install mftx with its extras, then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# SST-2 TSVs: ../shared/data/sst2 beside this checkout unless MFTX_DATA says otherwise.
MFTX_DATA ?= $(abspath ../shared/data/sst2)
export MFTX_DATA

.PHONY: venv demo test bench selfcheck lint docs wheel clean

$(BIN)/.installed: pyproject.toml CMakeLists.txt csrc/mftx_ops.cpp mftx/_version.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test,experiment]"
	touch $@

venv: $(BIN)/.installed

# The documentation site's tools (mkdocs-material, mkdocstrings), beside the rest.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

demo: venv
	$(BIN)/mftx demo --data "$(MFTX_DATA)"

test: venv
	$(BIN)/python -m pytest

selfcheck: venv
	$(BIN)/mftx selfcheck

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-json=bench-ops.json -p no:cacheprovider
	$(BIN)/python benchmarks/summarize.py bench-ops.json

# The documentation site into site/ (ignored); --strict: any warning (a broken link or
# anchor, an unresolved reference, a docstring griffe cannot parse) fails the build.
docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

wheel: venv
	$(BIN)/python -m pip wheel . -w dist --no-deps

clean:
	rm -rf build dist site *.egg-info .pytest_cache .benchmarks
