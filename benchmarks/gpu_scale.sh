#!/usr/bin/env bash
# The scale table on a CUDA GPU, run from the repository root as it is:
#     bash benchmarks/gpu_scale.sh              # float32, then TF32, then bf16 products
# Needs a CUDA build of torch and mftx with the hf extra (pip install -e ".[hf]");
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
# Prints one table per precision and writes gpu-scale-<precision>.json beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SIZES=${SIZES:-minilm,bert-base,bert-large}

"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"no CUDA device visible to torch {torch.__version__} (CPU build?)")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY
for precision in fp32 tf32 bf16; do
    echo
    echo "## precision $precision"
    "$PY" benchmarks/bench_scale.py --device cuda --precision "$precision" --sizes "$SIZES" \
        --batch "${BATCH:-8}" --length "${LENGTH:-64}" --threads 8 \
        --json "gpu-scale-$precision.json"
done
