#!/usr/bin/env bash
# One GPU session for issue 16 (H100/H200, no network), <= ~8 minutes: environment, the GPU tests
# (tests/nn/test_triton_gpu.py: compiled Triton kernels and the "auto" dispatch on CUDA), then benchmarks/gpu.py,
# whose first section checks the kernels again through the library's "auto" mode at the Llama-3-8B shapes.
# Results land in $OUT: env.txt, tests.log + tests.xml, gpu.log, gpu.json and tables.md (the markdown tables).
#
# From a session with a device lent (the `run` tool), once, leaving time for one rerun:
#     run(command="bash scripts/gpu_check.sh", timeout_s=540)
#     run(command="bash scripts/gpu_check.sh --quick", timeout_s=420)    # if the full run did not fit
# Extra arguments go to benchmarks/gpu.py (e.g. `--sections check layers`). SKIP_TESTS=1 skips the pytest step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"  # shared: the benchmark reuses the tests' builds
export OATS_KERNEL_CACHE="${OATS_KERNEL_CACHE:-/tmp/oats-kernels}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'capability', \
torch.cuda.get_device_capability())" 2>&1
    cat /proc/loadavg
} | tee "$OUT/env.txt"

tests_status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    # The gpu-marked tests; a hard 150 s limit (Triton autotunes and compiles each kernel variant once).
    timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/nn/test_triton_gpu.py \
        --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
    tests_status=${PIPESTATUS[0]}
    echo "GPU tests exit status: $tests_status" | tee -a "$OUT/tests.log"
fi

# 260 s of sections (each is skipped once the budget is spent), under a hard 330 s limit; every finished section
# is already in gpu.json if the limit strikes.
timeout 330 "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu.json" --budget-s 260 "$@" 2>&1 | tee "$OUT/gpu.log"
bench_status=${PIPESTATUS[0]}
echo "benchmarks/gpu.py exit status: $bench_status" | tee -a "$OUT/gpu.log"
grep -E '^(#|\|)' "$OUT/gpu.log" > "$OUT/tables.md" || true

[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
exit $?
