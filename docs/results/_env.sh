# Sourced by the scripts of docs/results/: the repository root as working directory, the
# data, the run directory (first argument, else the script's default) and the executables.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DATA="${MFTX_DATA:-$(cd .. && pwd)/shared/data/sst2}"
MFTX="${MFTX:-.venv/bin/mftx}"
PYTHON="${PYTHON:-.venv/bin/python}"
