#!/usr/bin/env bash
# One GPU session for issue 16 (H100/H200, no network): environment, then benchmarks/gpu.py, whose first section
# checks the compiled Triton kernels against the dense reference. Results land in $OUT (gpu.json, gpu.log, env.txt).
#
# From a session with a device lent (the `run` tool), once, leaving time for one rerun:
#     run(command="bash scripts/gpu_check.sh", timeout_s=560)
#     run(command="bash scripts/gpu_check.sh --quick", timeout_s=400)    # if the full run did not fit
# Extra arguments go to benchmarks/gpu.py (e.g. `--sections check layers`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'capability', \
torch.cuda.get_device_capability())" 2>&1
    cat /proc/loadavg
} | tee "$OUT/env.txt"

# 420 s of sections (each is skipped once the budget is spent), under a hard 500 s limit.
timeout 500 "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu.json" --budget-s 420 "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
echo "benchmarks/gpu.py exit status: $status" | tee -a "$OUT/gpu.log"
exit "$status"
