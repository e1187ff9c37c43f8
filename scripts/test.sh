#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rlkit kernels rewards tests benchmarks
.venv/bin/mypy rlkit kernels rewards
exec .venv/bin/pytest -q "$@"
