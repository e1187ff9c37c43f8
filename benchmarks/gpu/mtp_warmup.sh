#!/usr/bin/env bash
# MTP-RL's warm-up stage alone on the lent GPU (issue 15), from the repository root:
# recipes/mtp_arithmetic.yaml's mtp_warmup (WARMUP steps, default 60) on SmolLM2-135M-Instruct,
# then the trained module (mtp.safetensors, ~17 MB) and the stage's metrics into $OUT, for the
# CPU's speculative bench (`rlkit bench rollout --mtp DIR`) and later RL runs.
source benchmarks/gpu/setup.sh
# EVAL_EVERY / SAVE_EVERY: held-out accepted length and checkpoints every so many steps;
# LIMIT (seconds): stop the stage there (the last saved checkpoint is what comes back).
# TASK=arithmetic_set: warm up on recipes/sparse_rl_long.yaml instead (its task and sampling,
# no compression: the prompts benchmarks/gpu/spec_rollout.sh drafts for), responses up to
# MAX_NEW (768) tokens.
# TASK=counting: the same on recipes/sparse_rl_counting.yaml (the counting task).
recipe=recipes/mtp_arithmetic.yaml
task=()
if [ "${TASK:-}" = arithmetic_set ] || [ "${TASK:-}" = counting ]; then
  recipe=recipes/sparse_rl_long.yaml
  [ "$TASK" = counting ] && recipe=recipes/sparse_rl_counting.yaml
  task=(rollout.kv_compression.policy=none data.num_eval=16
    "rollout.speculative={drafter: sam+mtp, num_draft_tokens: 3, sam_min_match: 2, mtp_vocab: 8192}"
    rollout.max_new_tokens=${MAX_NEW:-768} eval.max_new_tokens=${MAX_NEW:-768})
fi
rm -rf /tmp/runs/mtp_warmup  # a warm machine's earlier run would be resumed
timeout ${LIMIT:-100000} python3 -m rlkit.cli train $recipe run.name=mtp_warmup \
  run.dir=/tmp/runs run.wandb=disabled run.progress_bar=false "${task[@]}" \
  "stages=[{type: mtp_warmup, name: warmup, overrides: {train.steps: ${WARMUP:-60}, train.eval_every: ${EVAL_EVERY:-20}, train.save_every: ${SAVE_EVERY:-20}, algorithm.mtp.lr: 1.0e-3}}]" \
  2>&1 | grep -v "Warning\|WARNING" | tail -8
ckpt=$(ls -dv /tmp/runs/mtp_warmup/checkpoints/0_warmup/step_* | tail -1)
ls $ckpt
mkdir -p $OUT/mtp_warmup
cp $ckpt/mtp.safetensors $OUT/mtp_warmup/ 2>/dev/null || cp $ckpt/model/mtp.safetensors $OUT/mtp_warmup/
cp /tmp/runs/mtp_warmup/metrics.jsonl /tmp/runs/mtp_warmup/summary.json $OUT/mtp_warmup/
