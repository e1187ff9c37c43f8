#!/usr/bin/env bash
# Where the default recipe's learner step spends its host time on the lent GPU: the colocated
# worker at the recipe's shape (16 prompts x 8, 46-token prompts, 32 new tokens, ignore_eos),
# STEPS timed steps (per-step rows: learner_s beside learner_cpu_s), as rlkit runs it and with
# the allocator's cache kept between phases, with a new padded length each step (as real
# rollouts), and that without cuDNN's attention; into $OUT/learner_host*.json. TRACE=1 also
# profiles each learner step and briefs it into $OUT/learner_trace.txt.
source benchmarks/gpu/setup.sh
m=$(python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))")
run() {
  python3 benchmarks/bench_train_step.py --model $m --device cuda --prompts 16 --n 8 \
    --prompt-len 46 --max-new-tokens ${NEW:-32} --steps ${STEPS:-12} --recipe recipes/grpo_arithmetic.yaml \
    ${TRACE:+--trace $OUT/learner_trace.txt} "$@" 2>&1 | grep -v Warning | grep "^step\|^warm" \
    | sed -E 's/(rollout_tokens_per_s|learner_mfu|rollout_gpu_peak_gb|kv_cache_released)[^,]*,?//g'
}
echo "== as rlkit runs it"; run --json $OUT/learner_host.json
echo "== allocator cache kept between phases"; run --keep-allocator-cache --json $OUT/learner_host_keep.json
echo "== new tokens drawn per step"; run --vary-lengths --json $OUT/learner_host_vary.json
echo "== new tokens drawn per step, SDPA without cuDNN"; run --vary-lengths --no-cudnn-attention --json $OUT/learner_host_vary_flash.json
