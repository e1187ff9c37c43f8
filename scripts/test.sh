#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The vLLM backend's own environment (.venv-vllm): tests/rollout/test_vllm_backend.py runs
# against it and fails without it. RLKIT_SKIP_VLLM=1 skips both the set-up and those tests.
if [ "${RLKIT_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm.sh
fi
.venv/bin/ruff check rlkit kernels rewards tests benchmarks
.venv/bin/mypy rlkit kernels rewards
exec .venv/bin/pytest -q "$@"
