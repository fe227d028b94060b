#!/usr/bin/env bash
# The GPU figures in one short run on one GPU machine (aim: under 8 minutes on an H100/H200):
#
#     bash bench/gpu_check.sh            # PYTHON=... to use another interpreter; OUT=dir keeps the logs
#
# 1. the tests marked `gpu` (they skip on a machine without CUDA, so here they must all run);
# 2. bench/scale.py on a full 32-layer Llama-2-7B-shaped pair with --device cuda. mergekit is left
#    out: it runs on the CPU whatever the machine, and its figure comes from the CPU run.
# Each step has its own time limit, so one slow step cannot eat the whole window.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d -t osd-gpu-check-XXXX)}
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}}
mkdir -p "$OUT"

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true

echo "== gpu tests" >&2
timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu-tests.txt"
if grep -q "skipped" "$OUT/gpu-tests.txt"; then
  echo "some gpu tests skipped on a GPU machine: see $OUT/gpu-tests.txt" >&2
  exit 1
fi

echo "== bench/scale.py, 32 layers on cuda" >&2
timeout 300 "$PYTHON" bench/scale.py --layers 32 --device cuda --no-mergekit --scratch "$SCRATCH" 2>&1 \
  | tee "$OUT/scale-32-cuda.txt"
echo "logs in $OUT" >&2
