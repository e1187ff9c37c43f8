#!/usr/bin/env bash
# The default recipe on the lent GPU (device=auto takes it), from the repository root.
# wandb is not on that machine: run.wandb=disabled. Results into $OUT.
source benchmarks/gpu/setup.sh
python3 -m rlkit.cli train recipes/grpo_arithmetic.yaml run.name=gpu_default run.dir=/tmp/runs \
  run.wandb=disabled run.progress_bar=false "$@" 2>&1 | grep -v "Warning\|WARNING" | tail -25
cp /tmp/runs/gpu_default/summary.json $OUT/gpu_default_summary.json
cp /tmp/runs/gpu_default/metrics.jsonl $OUT/gpu_default_metrics.jsonl
