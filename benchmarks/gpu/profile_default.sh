#!/usr/bin/env bash
# Where the default recipe's GPU step goes: bench_train_step.py with SmolLM2 at the default
# recipe's shape (16 prompts x 8, 48 new tokens, ignore_eos), phase seconds, and torch.profiler
# tables of one rollout and one learner step. Into $OUT.
source benchmarks/gpu/setup.sh
m=$(python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))")
python3 benchmarks/bench_train_step.py --model $m --device cuda --prompts 16 --n 8 \
  --prompt-len 46 --max-new-tokens ${NEW:-32} --steps 4 --recipe recipes/grpo_arithmetic.yaml \
  --profile $OUT/profile_default.txt --json $OUT/profile_default.json "$@" 2>&1 | grep -v Warning | tail -8
