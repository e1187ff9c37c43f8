#!/usr/bin/env bash
# Sparse-RL at the memory wall (issue 16) on the lent GPU, from the repository root: a random
# 1.5B Qwen2-shaped checkpoint (as step_1p5b.sh, with max_position_embeddings 4224 for
# 64 + 4096 tokens), then benchmarks/sparse_memory_wall.py: dense vs sparse (SnapKV budget 512,
# window 8, interval 64) at equal batch 64, sparse at equal KV memory (the dense batch-64
# cache's bytes as --kv-memory-gb), a device copy for the bandwidth floor of each step.
# Writes $OUT/gpu_sparse_memory_wall.json (device, equal_batch_speedup,
# equal_batch_kv_fraction, equal_memory_sequences_ratio, equal_memory_speedup, floors, rows)
# and $OUT/gpu_sparse_memory_wall.log. ALSO_INTERVAL=N: one more equal-memory row at
# compression interval N (`--also-interval`). COMPACTION=fill|ordered: both sparse rows
# compact that way (default auto); WALL_NAME: the JSON's and log's name. ROUNDS (default 3):
# the rows run that many times, each row's figure its median round. (A fresh process's first
# dense run was ~6% slower than the next ones until 2026-12-01: its 8-token warm-up built a
# 72-entry cache, and the timed run's 4,160-entry one compiled two more Triton kernels. A
# native dense row's GPU warm-up is now a whole run.) Expected: ~2.5 minutes a round on an
# H200 (dense ~20 s + its warm-up, sparse ~10 s, sparse at ~454 sequences ~36 s, warm-ups),
# tests ~40 s.
source benchmarks/gpu/setup.sh
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# First (~40 s) the compiled compression, one-launch attention and sampler kernels against
# their references and the CUDA-graph steps (every policy, H2O included) against eager ones;
# SPARSE_TESTS=0 skips them.
if [ "${SPARSE_TESTS:-1}" != 0 ]; then
  python3 -m pytest -q -p no:cacheprovider -rs --rootdir=$PWD tests/kernels/test_kv_compress.py \
    tests/kernels/test_sample_rows.py tests/kernels/test_decode_gemm.py \
    -k "cuda or gpu" 2>&1 | tail -4 | tee $OUT/gpu_sparse_memory_wall.log
  # The one-launch RoPE + append + attention: if its GPU test fails, the bench runs the
  # two-launch path (RLKIT_FUSED_ROPE_ATTENTION=0) and the log says so.
  python3 -m pytest -q -p no:cacheprovider -rs --rootdir=$PWD \
    tests/kernels/test_rope_decode_attention.py -k "cuda or gpu" 2>&1 | tail -4 \
    | tee -a $OUT/gpu_sparse_memory_wall.log
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "rope_decode_attention failed on this GPU: RLKIT_FUSED_ROPE_ATTENTION=0" \
      | tee -a $OUT/gpu_sparse_memory_wall.log
    export RLKIT_FUSED_ROPE_ATTENTION=0
  fi
  python3 -m pytest -q -p no:cacheprovider -rs --rootdir=$PWD \
    tests/rollout/test_cuda_graph_steps.py -k "cuda_graph_steps_decode_like_eager or never_sync or gate_up" 2>&1 \
    | tail -4 | tee -a $OUT/gpu_sparse_memory_wall.log
fi
memory_wall_model || exit 1
python3 benchmarks/sparse_memory_wall.py --model /tmp/m15b_4k --device cuda --batch 64 \
  --prompt-len 64 --new-tokens 4096 --policy snapkv --budget 512 --window 8 --interval 64 \
  --compaction "${COMPACTION:-auto}" --rounds "${ROUNDS:-3}" \
  --json "$OUT/${WALL_NAME:-gpu_sparse_memory_wall}.json" \
  ${ALSO_INTERVAL:+--also-interval $ALSO_INTERVAL} 2>&1 | grep -v Warning \
  | tee -a "$OUT/${WALL_NAME:-gpu_sparse_memory_wall}.log" | tail -60
