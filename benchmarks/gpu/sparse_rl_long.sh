#!/usr/bin/env bash
# Sparse-RL with long responses on the lent GPU (issue 16), from the repository root:
# recipes/sparse_rl_long.yaml (SmolLM2-135M-Instruct, task arithmetic_set: 26 labelled
# additions answered and then checked, up to 1536 new tokens, SnapKV budget 320 / window 16 /
# interval 32, with the Sparse-RL corrections) and the same recipe dense (policy none), same
# seed; then benchmarks/sparse_rl_long_summary.py: mean generated tokens, KV removed, rollout
# phase time ratio, held-out score gap (eval/reward_mean: the fraction of held-out additions
# answered right). STEPS shortens or lengthens both runs (default: the recipe's).
# MODES="sparse" or "dense" runs one of them (one device call each when both do not fit one);
# the summary needs both, from this machine's /tmp/runs or, afterwards, from the copies:
#   python benchmarks/sparse_rl_long_summary.py <files>/sparse_rl_long_sparse \
#     <files>/sparse_rl_long_dense --metric eval/reward_mean
# EXTRA: further overrides for both runs (e.g. EXTRA="rollout.kv_compression.budget=512").
# RECIPE: another recipe of recipes/ by name (e.g. RECIPE=sparse_rl_counting: the counting
# task, SnapKV 256 / 16 / 32); its runs and files are named after it, and the summary JSON is
# $OUT/gpu_${RECIPE}.json.
# Into $OUT: sparse_rl_long_{sparse,dense}/{summary.json,metrics.jsonl} and, with both runs,
# gpu_sparse_rl_long.json.
source benchmarks/gpu/setup.sh
steps=${STEPS:+train.steps=$STEPS}
recipe=${RECIPE:-sparse_rl_long}
for mode in ${MODES:-sparse dense}; do
  extra=""
  [ "$mode" = dense ] && extra="rollout.kv_compression.policy=none"
  start=$(date +%s)
  python3 -m rlkit.cli train recipes/$recipe.yaml ${EXTRA:-} $extra $steps \
    run.name=${recipe}_$mode run.dir=/tmp/runs run.wandb=disabled run.progress_bar=false \
    2>&1 | grep -v "Warning\|WARNING" | tail -12
  echo "== $mode: $(( $(date +%s) - start )) s"
  mkdir -p $OUT/${recipe}_$mode
  for f in summary.json metrics.jsonl; do
    cp /tmp/runs/${recipe}_$mode/$f $OUT/${recipe}_$mode/$f
  done
done
if [ -f /tmp/runs/${recipe}_sparse/summary.json ] && [ -f /tmp/runs/${recipe}_dense/summary.json ]; then
  python3 benchmarks/sparse_rl_long_summary.py /tmp/runs/${recipe}_sparse \
    /tmp/runs/${recipe}_dense --metric eval/reward_mean --json $OUT/gpu_${recipe}.json
fi
