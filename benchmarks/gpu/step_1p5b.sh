#!/usr/bin/env bash
# A random 1.5B Qwen2-shaped checkpoint (as benchmarks/RESULTS.md's earlier GPU rows), whole
# RL steps on the colocated worker at 64 x 8 x 1024 and 16 x 8 x 1024 (ignore_eos), the engine
# alone at the same shape, and the weight sync for it and SmolLM2. Results into $OUT.
source benchmarks/gpu/setup.sh
python3 -c "
from rlkit.models.tiny import save_tiny_model
save_tiny_model('/tmp/m15b', 'qwen2', vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=8192)"
python3 benchmarks/bench_train_step.py --model /tmp/m15b --device cuda --prompts ${PROMPTS:-64} \
  --n 8 --prompt-len 64 --max-new-tokens 1024 --steps ${STEPS:-2} --bench \
  --json $OUT/gpu_step_1p5b_64x8.json ${OVERRIDES:-} 2>&1 | grep -v Warning | tail -30
python3 benchmarks/bench_train_step.py --model /tmp/m15b --device cuda --prompts 16 --n 8 \
  --prompt-len 64 --max-new-tokens 1024 --steps ${STEPS:-2} \
  --json $OUT/gpu_step_1p5b_16x8.json ${OVERRIDES:-} 2>&1 | grep -v Warning | tail -8
for m in /tmp/m15b $(python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))"); do
  python3 benchmarks/bench_sync.py --model $m --json $OUT/gpu_sync_$(basename $m).json 2>&1 | tail -9
done
