#!/usr/bin/env bash
# The one GPU run of issue 34 (H100/H200, no network, nothing to install), <= 8 minutes wall in all:
#   1. the environment: GPU, clocks, versions, cuSPARSELt, pytest-xdist             -> env.txt
#   2. the decisive GPU tests (2:4 prefill on cuSPARSELt, dispatch to Triton), their own pytest call -> decisive.xml
#   3. the rest of the gpu-marked tests, `-n 4 --durations` when pytest-xdist is there           -> rest.xml
#   4. benchmarks/gpu.py: each section's JSON written when it ends, each compress row as soon as it ends -> gpu.json
#   5. the benchmark's summary (< 12 KB), printed LAST: the device tool returns the last 12,000 characters.
# Everything lands in $OUT (at most 8 files): env.txt tests.log decisive.xml rest.xml gpu.log gpu.json
# gpu.summary.md tables.md.
#
# From a session with a device lent (the `run` tool), once, leaving time for one rerun:
#     run(command="bash scripts/gpu_check.sh", timeout_s=540)
# CPU rehearsal (tiny shapes, Triton interpreter; tests/benchmarks/test_gpu.py runs it):
#     GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh
# Extra arguments go to benchmarks/gpu.py (e.g. `--sections env layers`). SKIP_TESTS=1 skips steps 2-3.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL_S="${TOTAL_S:-470}"  # the whole script, leaving the tool's start and transfers inside 8 minutes
left() { echo $((TOTAL_S - (SECONDS - START))); }
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"  # shared: the benchmark reuses the tests' builds
export OATS_KERNEL_CACHE="${OATS_KERNEL_CACHE:-$HOME/.cache/optimum_oats/kernels}"
if [ "$DEVICE" = "cpu" ]; then
    export TRITON_INTERPRET=1  # the rehearsal: Triton kernels through the interpreter, tiny shapes
    BENCH_ARGS=(--device cpu --tiny)
else
    unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
    BENCH_ARGS=()
fi

{
    echo "== environment $(date -u +%FT%TZ) device=$DEVICE"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,\
power.limit,temperature.gpu --format=csv 2>&1
    fi
    "$PYTHON" - <<'PY' 2>&1
import importlib.util, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except Exception as err:  # reported, not fatal: the CPU paths still run
    triton_version = f"unavailable ({err})"
cusparselt = getattr(torch.backends, "cusparselt", None)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton_version,
      "transformers", transformers.__version__)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, "capability", torch.cuda.get_device_capability(0), "SMs", props.multi_processor_count,
          "memory GiB", round(props.total_memory / 2**30, 1), "devices", torch.cuda.device_count())
print("cuSPARSELt", bool(cusparselt and cusparselt.is_available()),
      cusparselt.version() if cusparselt and cusparselt.is_available() else None)
print("pytest-xdist", importlib.util.find_spec("xdist") is not None)
PY
    cat /proc/loadavg
} | tee "$OUT/env.txt"

tests_status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    DECISIVE="two_four or dispatch"
    echo "== decisive GPU tests ($(left) s left)" | tee "$OUT/tests.log"
    timeout 110 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/nn/test_triton_gpu.py -k "$DECISIVE" \
        --junitxml="$OUT/decisive.xml" 2>&1 | tee -a "$OUT/tests.log"
    decisive_status=${PIPESTATUS[0]}
    echo "decisive GPU tests exit status: $decisive_status" | tee -a "$OUT/tests.log"
    XDIST=()
    if "$PYTHON" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
    rest_s=$(($(left) - 280))  # the benchmark keeps 280 s
    rest_status=0
    if [ "$rest_s" -gt 30 ]; then
        echo "== remaining GPU tests (${rest_s} s, ${XDIST[*]:-no xdist})" | tee -a "$OUT/tests.log"
        timeout "$rest_s" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/nn/test_triton_gpu.py \
            -k "not ($DECISIVE)" "${XDIST[@]}" --durations=15 --junitxml="$OUT/rest.xml" 2>&1 | tee -a "$OUT/tests.log"
        rest_status=${PIPESTATUS[0]}
    else
        echo "remaining GPU tests skipped: ${rest_s} s left for them" | tee -a "$OUT/tests.log"
    fi
    echo "remaining GPU tests exit status: $rest_status" | tee -a "$OUT/tests.log"
    tests_status=$((decisive_status != 0 || rest_status != 0))
fi

# The benchmark skips sections once its budget is spent; the hard limit leaves 10 s to print the summary.
budget=$(($(left) - 45))
echo "== benchmarks/gpu.py (budget ${budget} s)"
timeout $(($(left) - 10)) "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu.json" --budget-s "$budget" "${BENCH_ARGS[@]}" "$@" \
    > "$OUT/gpu.log" 2>&1
bench_status=$?
grep -E '^(#|\|)' "$OUT/gpu.log" > "$OUT/tables.md" || true
rm -f "$OUT"/*.tmp
sed -n '/^=== SUMMARY/,$!p' "$OUT/gpu.log" | tail -c 3000  # the end of the full log, before the summary
echo "GPU tests exit status: $tests_status; benchmarks/gpu.py exit status: $bench_status; $((SECONDS - START)) s"
if [ -s "$OUT/gpu.summary.md" ]; then
    cat "$OUT/gpu.summary.md"; echo
else
    echo "=== SUMMARY missing: the benchmark was killed; partial JSON in $OUT/gpu.json ==="
    tail -c 4000 "$OUT/gpu.log"
fi
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
