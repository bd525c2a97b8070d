#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, SmolLM2 integration tests included.
# Evaluation/calibration data is read from $OATS_DATA_DIR (default: ../shared/data); tests fail without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OATS_DATA_DIR="${OATS_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_DISABLE_TELEMETRY=1
# pytest's default output names each test file as it starts, so a long file never looks like a hang.
.venv/bin/python -m pytest "$@"
