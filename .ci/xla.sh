#!/usr/bin/env bash
# The XLA tests in their own venv: torch_xla 2.9 needs torch 2.9.0 exactly.
# Wheels (about 4 GB) are cached in MFTX_WHEEL_CACHE (default ~/.cache/mftx/wheels)
# so later runs on the same machine download nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MFTX_XLA_VENV:-.venv-xla}"
wheels="${MFTX_WHEEL_CACHE:-$HOME/.cache/mftx/wheels}"
pins=(torch==2.9.0 torch-xla==2.9.0)
mkdir -p "$wheels"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip download -q -d "$wheels" "${pins[@]}"
"$venv/bin/python" -m pip install -q --find-links "$wheels" "${pins[@]}"
constraints=$(mktemp)
printf '%s\n' "${pins[@]}" > "$constraints"
"$venv/bin/python" -m pip install -q -c "$constraints" -Cbuild-dir=build/xla -e ".[test]"
rm -f "$constraints"
"$venv/bin/python" -c "import torch, torch_xla; print('torch', torch.__version__, 'torch_xla', torch_xla.__version__)"

PJRT_DEVICE=CPU MFTX_REQUIRE_XLA=1 "$venv/bin/python" -m pytest tests/test_xla.py -p no:cacheprovider
