#!/usr/bin/env bash
# Why a fresh machine's first dense memory-wall run is ~7% slower (issue 16): the dense
# batch-64 row (random 1.5B Qwen2 shape, 4,096 new tokens) three times in one process, with
# nvidia-smi sampling the SM and memory clocks, power, temperature and throttle reasons every
# 500 ms. Writes $OUT/dense_first_run.log and $OUT/dense_first_run_smi.csv.
source benchmarks/gpu/setup.sh
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 500 > "$OUT/dense_first_run_smi.csv" &
SMI=$!
python3 -c "
from rlkit.models.tiny import save_tiny_model
save_tiny_model('/tmp/m15b_4k', 'qwen2', vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=4224)" > /dev/null 2>&1
python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/dense_first_run.log"
import time, torch
from rlkit.bench import rollout
args = ["--model", "/tmp/m15b_4k", "--device", "cuda", "--dtype", "bfloat16", "--engines",
        "native", "--prompt-len", "64", "--max-new-tokens", "4096", "--repeats", "1",
        "--batch", "64", "--modes", "dense"]
for i in range(3):
    t = time.strftime("%H:%M:%S")
    row = rollout(args)[0]
    print(f"DENSE run {i + 1} (started {t}): {row['ms_per_step']:.3f} ms a step", flush=True)
    torch.cuda.empty_cache()
PY
kill $SMI
