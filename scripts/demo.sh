#!/usr/bin/env bash
# The main job: set up, compress the embedded SmolLM2-135M-Instruct with OATS (rho=0.5, kappa=0.25), then score
# the compressed and the dense model side by side (WikiText-2 token perplexity and a zero-shot sample), and print
# what was gained and lost: checkpoint size, generation speed, peak memory, quality with its standard error.
# Data is read from $OATS_DATA_DIR (default: ../shared/data). Takes ~15 minutes on 2 quiet CPU cores (33 on a busy one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OATS_DATA_DIR="${OATS_DATA_DIR:-$(cd .. && pwd)/shared/data}"
OUT="${OUT:-smollm2-oats}"
.venv/bin/optimum-cli oats compress default -o "$OUT" \
    --compression-rate 0.5 --rank-ratio 0.25 --dataset c4 --num-samples 16 --seqlen 1024 --num-iterations 80 --svd fast
.venv/bin/optimum-cli oats evaluate "$OUT" --dense default \
    --seqlen 2048 --max-windows 8 --tasks arc_easy piqa boolq --limit 100 --batch-size 8 --output "$OUT/eval_results.json"
# Sizes, generation speed and peak memory of both models, and the quality rows with their standard errors.
.venv/bin/python scripts/demo_summary.py "$OUT"
