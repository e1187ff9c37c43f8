#!/usr/bin/env bash
# Programmatic dependent launch on and off (RLKIT_PDL), side by side on one machine, from the
# repository root on the lent GPU: `rlkit bench rollout` of the memory wall's random 1.5B
# Qwen2 shape, dense and sparse (SnapKV budget 512 / window 8 / interval 64) at 64 rows over
# NEW tokens (default 1024), in alternating processes off, on, off, on (each the median of 3
# repeats). Writes $OUT/gpu_pdl_ab.log.
source benchmarks/gpu/setup.sh
memory_wall_model
for pdl in 0 1 0 1; do
  echo "RLKIT_PDL=$pdl" | tee -a "$OUT/gpu_pdl_ab.log"
  RLKIT_PDL=$pdl python3 -c "import sys; from rlkit.cli import main; sys.argv[0] = 'rlkit'; main()" \
    bench rollout --model /tmp/m15b_4k --device cuda --dtype bfloat16 --engines native \
    --prompt-len 64 --max-new-tokens "${NEW:-1024}" --repeats 3 --policy snapkv --budget 512 \
    --window 8 --interval 64 --batch 64 --modes dense,sparse 2>&1 | grep "^native" \
    | tee -a "$OUT/gpu_pdl_ab.log"
done
