#!/usr/bin/env bash
# Where the GPU time and memory go, on the lent GPU, from the repository root (into $OUT):
# 1. the default recipe's step shape (bench_train_step.py, SmolLM2, 16 x 8, 48 new tokens):
#    what was alive at the learner's memory peak (mem_default.txt) and torch.profiler tables
#    (profile_default.txt);
# 2. the CUDA-graph step tests (cg_tests.log);
# 3. profile_rollout.py tables: SmolLM2 dense vs spec (sam+mtp, untrained MTP: the tables
#    show the step's overhead, not a trained drafter's acceptance) at batch 128, 256 tokens;
#    a random 1.5B Qwen2 shape dense vs sparse (SnapKV 512/8/64) at batch 64, 1024 tokens.
source benchmarks/gpu/setup.sh
m=$(python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))")
timeout 150 python3 benchmarks/bench_train_step.py --model $m --device cuda --prompts 16 --n 8 \
  --prompt-len 46 --max-new-tokens 48 --steps 3 --recipe recipes/grpo_arithmetic.yaml \
  --memory $OUT/mem_default.txt --profile $OUT/profile_default.txt 2>&1 | grep -v Warn | tail -40
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs --rootdir=$PWD \
  tests/rollout/test_cuda_graph_steps.py -k "not triton_interpreted" > $OUT/cg_tests.log 2>&1
tail -15 $OUT/cg_tests.log
for mode in dense spec; do
  timeout 120 python3 benchmarks/profile_rollout.py --model $m --mode $mode --batch 128 \
    --new-tokens 256 --mtp-vocab 8192 --out $OUT/prof_smol_$mode.txt 2>&1 | grep -v Warn | head -3
done
memory_wall_model
for mode in dense sparse; do
  timeout 120 python3 benchmarks/profile_rollout.py --model /tmp/m15b_4k --mode $mode --batch 64 \
    --new-tokens 1024 --out $OUT/prof_15b_$mode.txt 2>&1 | grep -v Warn | head -3
done
