#!/usr/bin/env bash
# Where the memory wall's steps go (issue 16), from the repository root on the lent GPU:
# benchmarks/profile_rollout.py tables of the random 1.5B Qwen2 shape at the memory wall's
# settings (64-token prompts, SnapKV budget 512 / window 8 / interval 64): dense and sparse at
# 64 rows over NEW tokens (default 1024: the sparse rows compress from token 512 on, so the
# kernels outside the attention and the compression events both show), and sparse at ROWS454
# rows (default 454, the equal-memory row) over NEW454 tokens (default 640: the profiler's
# trace of many steps at ~450 rows takes minutes to process). Every kernel but the attention
# and the compression is the same in the dense and the sparse 64-row steps, so the two tables
# side by side show what is sparse-only. Writes $OUT/profiles/gpu_prof_wall_*.txt.
source benchmarks/gpu/setup.sh
memory_wall_model
mkdir -p "$OUT/profiles"
common=(--model /tmp/m15b_4k --device cuda --prompt-len 64 --budget 512 --window 8 --interval 64 --rows 45)
for mode in dense sparse; do
  python3 benchmarks/profile_rollout.py "${common[@]}" --mode $mode --batch 64 \
    --new-tokens "${NEW:-1024}" --out "$OUT/profiles/gpu_prof_wall_b64_$mode.txt" 2>&1 \
    | grep "^profile_rollout\|^stats" | cut -c1-300
done
python3 benchmarks/profile_rollout.py "${common[@]}" --mode sparse --batch "${ROWS454:-454}" \
  --new-tokens "${NEW454:-640}" --out "$OUT/profiles/gpu_prof_wall_b${ROWS454:-454}_sparse.txt" \
  2>&1 | grep "^profile_rollout\|^stats" | cut -c1-300
