#!/usr/bin/env bash
# Which Triton kernels compile during a fresh process's first timed dense run (issue 16's
# slow first dense row): the dense batch-64 row once with an empty TRITON_CACHE_DIR, the
# warm-up's end and the timed run's start and end stamped, then every cached kernel's name,
# compile time and constants. Writes $OUT/dense_first_run_compiles.log.
source benchmarks/gpu/setup.sh
export TRITON_CACHE_DIR=/tmp/triton_cache_probe
rm -rf "$TRITON_CACHE_DIR"
python3 -c "
from rlkit.models.tiny import save_tiny_model
save_tiny_model('/tmp/m15b_4k', 'qwen2', vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=4224)" > /dev/null 2>&1
python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/dense_first_run_compiles.log"
import glob, json, os, time
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
row = rb.rollout(args)[0]
print(f"dense: {row['ms_per_step']:.3f} ms a step", flush=True)
for f in sorted(glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/*.json"), key=os.path.getmtime):
    if os.path.basename(f).startswith("__grp__"):
        continue
    meta = json.load(open(f))
    print(f"{os.path.getmtime(f):.3f} {meta.get('name')} consts={meta.get('constants')}", flush=True)
PY
