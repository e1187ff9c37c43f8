#!/usr/bin/env bash
# README command 1: set up, then train the default recipe (GRPO, SmolLM2-135M-Instruct, 2-digit addition).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlkit train recipes/grpo_arithmetic.yaml "$@"
