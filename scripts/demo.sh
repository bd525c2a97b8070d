#!/usr/bin/env bash
# The main job: set up, compress the embedded SmolLM2-135M-Instruct with the project's best setting, then score the
# compressed and the dense model side by side and print what was gained and lost: checkpoint size, generation speed,
# peak memory, WikiText-2 perplexity, zero-shot accuracy with its noise marked, and greedy chat answers of both.
# Data is read from $OATS_DATA_DIR (default: ../shared/data).
#   bash scripts/demo.sh           # the full demo
#   bash scripts/demo.sh --quick   # a first look: smaller calibration and evaluation, no zero-shot tasks
# Times (set-up included, on 2 quiet CPU cores) are in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
START=$(date +%s)
bash scripts/setup.sh
export OATS_DATA_DIR="${OATS_DATA_DIR:-$(cd .. && pwd)/shared/data}"
OUT="${OUT:-smollm2-oats}"
if [ "$QUICK" = 1 ]; then
    CALIBRATION=(--num-samples 8 --seqlen 512)
    EVALUATION=(--seqlen 1024 --max-windows 4 --tasks none)
    GENERATIONS=1
else
    CALIBRATION=(--num-samples 16 --seqlen 1024)
    # piqa and arc_easy: tasks a 135M model does well above chance; 400 documents each (±0.025). hellaswag's long
    # contexts doubled the scoring time for the same noise, past the 15 minutes the demo aims for.
    EVALUATION=(--seqlen 2048 --max-windows 4 --tasks piqa arc_easy --limit 400 --batch-size 16)
    GENERATIONS=3
fi
# The best setting measured (BENCHMARKS.md, "Size and quality"): hassle at rho 0.3 with 4-bit kept values and 8-bit
# U, V, about 4.2 bits per weight, below 4-bit GPTQ's 4.25 bits and its perplexity; the tied embedding / LM head as
# int8 rows (half its bytes, +0.05% perplexity).
echo "== compressing SmolLM2-135M-Instruct (hassle, rho 0.3, 4-bit values, 8-bit low-rank factors, int8 embedding)"
.venv/bin/optimum-cli oats compress default -o "$OUT" --method hassle --compression-rate 0.3 \
    --value-bits 4 --lowrank-bits 8 --embedding-bits 8 --dataset c4 "${CALIBRATION[@]}"
echo "== scoring the compressed and the dense model"
.venv/bin/optimum-cli oats evaluate "$OUT" --dense default "${EVALUATION[@]}" --output "$OUT/eval_results.json"
# Sizes, generation speed and peak memory of both models, the quality rows with their noise, and chat answers.
.venv/bin/python scripts/demo_summary.py "$OUT" --generations "$GENERATIONS"
echo "demo finished in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
