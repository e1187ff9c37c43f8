#!/usr/bin/env bash
# Issue 15's GPU figures in two back-to-back device calls (the machine keeps /tmp while warm,
# ~30 s idle), from the repository root, after the carry of Ray, SmolLM2 and jsonschema
# (../shared/tools/device-carry: the wheels in /tmp/files). Each phase stays under the
# 10-minute call limit.
#   PHASE=1 (~7 min): the compiled GPU tests of the speculative path (the interpreted ones
#     fail under the machine's Triton 3.6 interpreter and are left out) -> $OUT/gpu_tests.txt;
#     then the MTP warm-up on the spec recipe's own prompts (benchmarks/gpu/mtp_warmup.sh,
#     TASK=arithmetic_set, LIMIT seconds, default 240) -> /tmp/mtp_module, and $OUT/mtp_warmup/
#     (the metrics and the module in parts).
#   PHASE=2 (~5 min a drafter and k, plus dense): the rollout phase dense against each drafter
#     in DRAFTERS (default "sam sam+mtp"; sam+mtp only where phase 1 left a module) at each k
#     in KS (default "3"), STEPS RL steps each (benchmarks/gpu/spec_rollout.sh)
#     -> $OUT/gpu_spec_rollout.json, the runs' metrics tarred into $OUT/spec_runs.tgz ($OUT
#     returns at most 8 files).
#   PHASE=warmup (~4 min): the MTP warm-up alone (a second machine start: the module is lost
#     with the machine).
#   PHASE=bench (~1 minute a setting): the rollout phase at one policy, the fair comparison:
#     RL runs train on their own samples, so their policies and response lengths drift apart
#     and their rollout seconds stop being the same work. `rlkit bench rollout` of the recipe's
#     step (sparse_rl_long: arithmetic_set, 8 prompts x 8, T = 1, top-p 0.7, up to 1,536 new
#     tokens, to EOS), dense and spec rows interleaved over REPEATS (default 6), SmolLM2 with
#     the module of phase 1 / warmup; DRAFTERS (default "sam+mtp"; a comma list gives a row
#     each beside one dense row, e.g. "sam,sam+mtp"; argmax MTP drafts), k = KS (default 3),
#     one bench per tail in TAILS (default 16:6; rows:k) and tail chain count in BCHAINS
#     (default "1 4") -> $OUT/${BNAME}_c{C}[_t{rows}x{k}].json and
#     $OUT/gpu_spec_rollout_${BNAME}.json (BNAME default bench). $OUT returns at most 8 files.
#     STEP_TIMES=1: the step timeline too (`--step-times`: mean ms a step by kind and rows,
#     plain against verify; the device is synchronised around each step, so that run's phase
#     seconds are not the figure: use REPEATS=1 and a BNAME of its own).
#   PHASE=prof (~1 minute a row): where a verify step's time goes, one chain against several
#     (benchmarks/profile_rollout.py, sam+mtp argmax, k = 3, the module from phase 1 if any)
#     at each batch in BATCHES (default "16 4") for each chain count in PCHAINS (default
#     "1 4") -> $OUT/prof_c{C}_b{B}.txt.
#     ADAPTIVE=1: the draft length follows the acceptance (`--adaptive-draft`).
#   TASK=counting (warmup, bench, prof): recipes/sparse_rl_counting.yaml's task (write every
#     number from A to B, 120-220 of them) instead of arithmetic_set, for warm-up and bench.
#   MTP_PARTS=DIR: a folder of the repository (git-ignored, e.g. .mtp_parts; in the call's carry) holding
#     the mtp.safetensors.part-* files an earlier warm-up returned in $OUT/mtp_warmup/: the
#     module is restored from them into /tmp/mtp_module (no warm-up on this machine start).
source benchmarks/gpu/setup.sh
if [ -n "${MTP_PARTS:-}" ] && [ ! -f /tmp/mtp_module/mtp.safetensors ]; then
  mkdir -p /tmp/mtp_module && cat "$MTP_PARTS"/mtp.safetensors.part-* > /tmp/mtp_module/mtp.safetensors
fi
task=${TASK:-arithmetic_set}
task_args='{"problems": 26, "digits": [2, 1]}'
[ "$task" = counting ] && task_args='{"start": [100, 799], "length": [120, 220]}'
if [ "${PHASE:-1}" = prof ]; then
  mtp=()
  [ -f /tmp/mtp_module/mtp.safetensors ] && mtp=(--mtp /tmp/mtp_module)
  for b in ${BATCHES:-16 4}; do
    for c in ${PCHAINS:-1 4}; do
      python3 benchmarks/profile_rollout.py --model smollm2-135m-instruct --task "$task" \
        --task-args "$task_args" --top-p 0.7 --new-tokens 384 \
        --rows 40 --mode spec --drafter sam+mtp --mtp-draft argmax --mtp-vocab 8192 "${mtp[@]}" \
        --draft-chains "$c" --num-draft-tokens 3 --batch "$b" --out "$OUT/prof_c${c}_b$b.txt" \
        2>&1 | grep "^profile_rollout\|^stats" | cut -c1-400
    done
  done
  exit 0
fi
if [ "${PHASE:-1}" = warmup ]; then
  TASK=$task LIMIT=${LIMIT:-200} WARMUP=${WARMUP:-400} bash benchmarks/gpu/mtp_warmup.sh
  exit 0
fi
if [ "${PHASE:-1}" = bench ]; then
  mtp=()
  [ -f /tmp/mtp_module/mtp.safetensors ] && mtp=(--mtp /tmp/mtp_module)
  draw=()
  case ${DRAFTERS:-sam+mtp} in *mtp*) draw=(--mtp-draft argmax);; esac
  files=()
  for tail in ${TAILS:-16:6}; do
  for c in ${BCHAINS:-1 4}; do
    if [ "${tail%:*}" = 0 ]; then  # no tail: no tail chains either (one bench)
      [ "$c" = "$(echo ${BCHAINS:-1 4} | cut -d' ' -f1)" ] || continue
      c=0
    fi
    name=${BNAME:-bench}_c$c
    [ "$tail" = 16:6 ] || name=${name}_t${tail/:/x}
    python3 -m rlkit.cli bench rollout --model smollm2-135m-instruct --task "$task" \
      --task-args "$task_args" --batch 64 --group 8 \
      --max-new-tokens 1536 --temperature 1 --top-p 0.7 --stop-at-eos --engines native \
      --modes dense,spec --drafter "${DRAFTERS:-sam+mtp}" "${mtp[@]}" "${draw[@]}" \
      --mtp-vocab 8192 --num-draft-tokens "${KS:-3}" --sam-min-match "${SAM_MIN_MATCH:-2}" \
      --tail-rows "${tail%:*}" --tail-draft-tokens "${tail#*:}" --tail-draft-chains "$c" \
      --interleave --repeats "${REPEATS:-6}" --json "$OUT/$name.json" \
      ${STEP_TIMES:+--step-times} ${ADAPTIVE:+--adaptive-draft} 2>&1 | grep -v Warn | tail -${STEP_TIMES:+1}6
    files+=("$OUT/$name.json")
  done
  done
  python3 benchmarks/spec_summary.py bench "${files[@]}" --out "$OUT/gpu_spec_rollout_${BNAME:-bench}.json" \
    | grep '"drafter"\|"tail_draft_chains"\|"accept_len_mean"\|"rollout_seconds\|"reduction"'
  exit 0
fi
if [ "${PHASE:-1}" = 1 ]; then
  python3 -m pytest -q -k "not interpreted" tests/kernels/test_top_p.py \
    tests/kernels/test_sparse_decode_attention.py tests/kernels/test_spec_verify.py \
    tests/rollout/test_cuda_graph_steps.py tests/rollout/test_speculative.py \
    tests/rollout/test_sam.py tests/rollout/test_sync_free_spec.py \
    tests/kernels/test_sam_device.py tests/rollout/test_draft_chains.py 2>&1 | grep -v Warn | tail -15 | tee $OUT/gpu_tests.txt
  TASK=arithmetic_set LIMIT=${LIMIT:-240} WARMUP=${WARMUP:-400} bash benchmarks/gpu/mtp_warmup.sh
  exit 0
fi
drafters=${DRAFTERS:-sam sam+mtp}
from=""
if [ -f /tmp/mtp_module/mtp.safetensors ]; then
  from=/tmp/mtp_module
else
  drafters=$(echo $drafters | tr ' ' '\n' | grep -v mtp | tr '\n' ' ')
fi
MTP_FROM=$from DRAFTERS="$drafters" KS="${KS:-3}" STEPS=${STEPS:-6} \
  bash benchmarks/gpu/spec_rollout.sh 2>&1 | grep -v '"run"\|plots\|directory' | tail -40
mkdir -p /tmp/spec_keep && mv $OUT/spec_rollout_* /tmp/spec_keep/ 2>/dev/null
tar -czf $OUT/spec_runs.tgz -C /tmp/spec_keep .
