#!/usr/bin/env bash
# Where a speculative step's time goes against a plain step's on the lent GPU (issue 15), from
# the repository root: benchmarks/profile_rollout.py on SmolLM2 with arithmetic_set prompts
# (8 samples a prompt, T = 1, top-p 0.7, ignore_eos, NEW tokens, default 512), the sync-free
# SAM step at k = K (default 6) and the plain step, at each batch in BATCHES (default "64 8").
# Tables into $OUT/prof_{spec_k$K,dense}_b$B.txt; the first lines (wall time, stats) printed.
source benchmarks/gpu/setup.sh
common=(--model smollm2-135m-instruct --task arithmetic_set
  --task-args '{"problems": 26, "digits": [2, 1]}' --top-p 0.7 --new-tokens "${NEW:-512}" --rows 45)
for b in ${BATCHES:-64 8}; do
  python3 benchmarks/profile_rollout.py "${common[@]}" --mode spec --drafter sam \
    --num-draft-tokens "${K:-6}" --batch "$b" --out "$OUT/prof_spec_k${K:-6}_b$b.txt" | head -2
  python3 benchmarks/profile_rollout.py "${common[@]}" --mode dense --batch "$b" \
    --out "$OUT/prof_dense_b$b.txt" | head -2
done
