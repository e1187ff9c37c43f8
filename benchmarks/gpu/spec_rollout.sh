#!/usr/bin/env bash
# MTP-RL's rollout phase on the lent GPU (issue 15), from the repository root: RL steps of
# recipes/sparse_rl_long.yaml without its KV compression (SmolLM2-135M-Instruct, task
# arithmetic_set: 26 labelled additions copied from the prompt and answered, T = 1, top-p 0.7,
# 8 prompts x 8, up to 1,536 new tokens), dense, then with speculative rollouts per drafter,
# same seed; then benchmarks/spec_summary.py gpu (mean `timing/rollout` per step after the
# first, accepted length, reduction, best drafter) into $OUT/gpu_spec_rollout.json.
# Needs SmolLM2 and Ray carried (../shared/tools/device-carry). DRAFTERS picks the runs
# (default "sam": no MTP module needed); "sam+mtp" / "mtp" need MTP_FROM=DIR (a directory
# with mtp.safetensors, e.g. from benchmarks/gpu/mtp_warmup.sh in the same call). STEPS
# (default 6) per run; KS (default "3"): the draft lengths k to run each drafter at; TAILS
# (default "0:0"): rollout.speculative.tail_rows:tail_draft_tokens settings to run each k at
# (e.g. "0:0 8:12": also a 12-token draft once at most 8 sequences run). The learner trains
# as usual: only the rollouts differ. RECIPE (default recipes/sparse_rl_long.yaml) and EXTRA
# (further overrides for every run) measure another recipe, e.g. RECIPE=recipes/mtp_arithmetic.yaml
# EXTRA="stages=[rlvr] algorithm.mtp.loss=frozen" (its RL stage with SAM drafts alone).
# MTP_DRAFT=argmax: the mtp / sam+mtp runs draft the MTP module's argmax (no q, no sampling
# pass per depth; rollout.speculative.mtp_draft). SAM_MIN_MATCH (default 2): SAM's threshold
# (sam+mtp: below it MTP drafts). CHAINS (default "1:0"): rollout.speculative.draft_chains:
# tail_draft_chains settings to run each k and tail at (several draft chains a row verified
# in one step; they need MTP_DRAFT=argmax for the MTP drafters, and a tail for the second).
# CHAIN_KINDS (default: the config's, "sam, mtp, mtp_runner_up, sam_other"): which chains, in
# order, e.g. "sam, mtp, sam_other" (no runner-up chain).
source benchmarks/gpu/setup.sh
steps=${STEPS:-6}
common="rollout.kv_compression.policy=none train.steps=$steps train.eval_every=0 data.num_eval=8
  run.dir=/tmp/runs run.wandb=disabled run.progress_bar=false"
model=smollm2-135m-instruct
if [ -n "${MTP_FROM:-}" ]; then
  smollm2_with_mtp "$MTP_FROM" && model=/tmp/smollm2_mtp
fi
runs=""
for run in none ${DRAFTERS:-sam}; do
 for k in $([ "$run" = none ] && echo 0 || echo ${KS:-3}); do
 for tail in $([ "$run" = none ] && echo 0:0 || echo ${TAILS:-0:0}); do
 for chains in $([ "$run" = none ] && echo 1:0 || echo ${CHAINS:-1:0}); do
  drafter=$run
  name=spec_rollout_${drafter/+/_}
  [ "$drafter" = none ] || name=${name}_k$k
  [ "$tail" = 0:0 ] || name=${name}_t${tail/:/x}
  [ "$chains" = 1:0 ] || name=${name}_c${chains/:/x}
  [ -z "${CHAIN_KINDS:-}" ] || name=${name}_$(echo "$CHAIN_KINDS" | tr -d ' ' | tr ',' '-')
  case $drafter in *mtp*) [ "${MTP_DRAFT:-sample}" = sample ] || name=${name}_${MTP_DRAFT};; esac
  [ "${SAM_MIN_MATCH:-2}" = 2 ] || name=${name}_mm${SAM_MIN_MATCH}
  draw=""  # MTP_DRAFT=argmax: the MTP drafters' argmax drafts (rollout.speculative.mtp_draft)
  case $drafter in *mtp*) draw=", mtp_draft: ${MTP_DRAFT:-sample}";; esac
  spec="rollout.speculative={drafter: $drafter, num_draft_tokens: $k, sam_min_match: ${SAM_MIN_MATCH:-2}, mtp_vocab: 8192, tail_rows: ${tail%:*}, tail_draft_tokens: ${tail#*:}, draft_chains: ${chains%:*}, tail_draft_chains: ${chains#*:}$draw${CHAIN_KINDS:+, chain_kinds: [$CHAIN_KINDS]}}"
  [ "$drafter" = none ] && spec="rollout.speculative.drafter=none"  # a recipe may draft
  start=$(date +%s)
  rm -rf /tmp/runs/$name  # a run directory left by an earlier call would be resumed
  python3 -m rlkit.cli train ${RECIPE:-recipes/sparse_rl_long.yaml} model.path=$model $common ${EXTRA:-} \
    run.name=$name ${spec:+"$spec"} 2>&1 | grep -v "Warning\|WARNING" | tail -4
  echo "== $drafter: $(( $(date +%s) - start )) s"
  mkdir -p $OUT/$name
  for f in summary.json metrics.jsonl config.yaml; do cp /tmp/runs/$name/$f $OUT/$name/ 2>/dev/null; done
  [ "$drafter" = none ] || runs="$runs /tmp/runs/$name"
 done
 done
 done
done
python3 benchmarks/spec_summary.py gpu --dense /tmp/runs/spec_rollout_none --spec $runs \
  --out $OUT/gpu_spec_rollout.json --skip-first 1
