#!/usr/bin/env bash
# MTP-RL's warm-up stage alone on the lent GPU (issue 15), from the repository root:
# recipes/mtp_arithmetic.yaml's mtp_warmup (WARMUP steps, default 60) on SmolLM2-135M-Instruct,
# then the trained module (mtp.safetensors, ~17 MB, in parts) and the stage's metrics into $OUT, for the
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
# The module (~17 MB) goes to /tmp/mtp_module and, in parts under the 16 MiB a file that
# comes back from $OUT, to $OUT/mtp_warmup/mtp.safetensors.part-*: a later machine start
# restores it from a carried copy of them (spec_session.sh's MTP_PARTS) instead of warming up
# again.
mkdir -p $OUT/mtp_warmup /tmp/mtp_module
cp $ckpt/mtp.safetensors /tmp/mtp_module/ 2>/dev/null || cp $ckpt/model/mtp.safetensors /tmp/mtp_module/
split -b 12M /tmp/mtp_module/mtp.safetensors $OUT/mtp_warmup/mtp.safetensors.part-
cp /tmp/runs/mtp_warmup/metrics.jsonl $OUT/mtp_warmup/
cp /tmp/runs/mtp_warmup/summary.json $OUT/mtp_warmup/ 2>/dev/null
