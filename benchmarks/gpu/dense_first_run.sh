#!/usr/bin/env bash
# Why a fresh process's first dense memory-wall row was slower (issue 16): the dense batch-64
# row (random 1.5B Qwen2 shape, 4,096 new tokens) RUNS times (default 3) in one process, with
# an empty Triton cache and nvidia-smi sampling the SM and memory clocks, power, temperature and
# throttle reasons every 500 ms. Each run's warm-up and timed run are stamped, and at the end
# every kernel Triton compiled is listed with its compile time, so a compilation inside a
# timed run shows. Writes $OUT/dense_first_run.log and $OUT/dense_first_run_smi.csv.
# The 2026-12-01 figures came from this script's two halves at 99a678a, before a native dense
# row's GPU warm-up became a whole run; from b8d0c89 on, no timed run should compile anything
# and the runs should agree.
source benchmarks/gpu/setup.sh
export TRITON_CACHE_DIR=/tmp/triton_cache_probe
rm -rf "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 500 > "$OUT/dense_first_run_smi.csv" &
SMI=$!
memory_wall_model
RUNS=${RUNS:-3} python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/dense_first_run.log"
import glob, json, os, time
import torch
import rlkit.bench as rb
real_warm, real_repeat = rb._warm, rb._repeat
def stamp(what):
    print(f"{what} at {time.time():.3f}", flush=True)
def warm(*a, **k):
    stamp("warm-up start"); out = real_warm(*a, **k); stamp("warm-up end"); return out
def repeat(*a, **k):
    stamp("timed start"); out = real_repeat(*a, **k); stamp("timed end"); return out
rb._warm, rb._repeat = warm, repeat
args = ["--model", "/tmp/m15b_4k", "--device", "cuda", "--dtype", "bfloat16", "--engines",
        "native", "--prompt-len", "64", "--max-new-tokens", "4096", "--repeats", "1",
        "--batch", "64", "--modes", "dense"]
for i in range(int(os.environ["RUNS"])):
    row = rb.rollout(args)[0]
    print(f"DENSE run {i + 1}: {row['ms_per_step']:.3f} ms a step", flush=True)
    torch.cuda.empty_cache()
for f in sorted(glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/*.json"), key=os.path.getmtime):
    if not os.path.basename(f).startswith("__grp__"):
        print(f"{os.path.getmtime(f):.3f} compiled {json.load(open(f)).get('name')}", flush=True)
PY
kill $SMI
