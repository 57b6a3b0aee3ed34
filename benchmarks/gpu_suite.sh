#!/usr/bin/env bash
# GPU figures (see benchmarks/gpu_suite.py): tokens/s with and without logging for a
# GPT-2-124M-sized model in bf16, influence pairs/s against cuBLAS, peak GPU memory, and the
# writer's pinned-buffer path. Skips (exit 0) where CUDA is not available.
#   bash benchmarks/gpu_suite.sh [OUT.json] [extra gpu_suite.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
out="${1:-gpu_suite.json}"
shift || true
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_suite: no CUDA device here, skipped"
  exit 0
fi
"$python" -c 'import torch; print("gpu_suite:", torch.cuda.get_device_name(), "torch", torch.__version__)'
timeout 600 "$python" benchmarks/gpu_suite.py --json "$out" "$@"
echo "gpu_suite: results in $out"
