#!/usr/bin/env bash
# MTP-RL on the lent GPU (issue 15): recipes/mtp_arithmetic.yaml with each MTP loss, and the
# dense baseline (same seed, same warm-up), then the rollout-phase comparison. LOSSES picks
# the runs (default: frozen plain advantage dense); STEPS / WARMUP shorten them. Into $OUT.
# MTP_FROM=DIR: start every run from the mtp.safetensors in DIR (e.g. a warm-up done on
# another machine, carried with `run`'s carry) on top of SmolLM2, without a warm-up stage.
source benchmarks/gpu/setup.sh
stages="stages=[{type: mtp_warmup, name: warmup, overrides: {train.steps: ${WARMUP:-30}, train.eval_every: 0, algorithm.mtp.lr: 1.0e-3}}, {type: rlvr, name: rl}]"
model=smollm2-135m-instruct
if [ -n "${MTP_FROM:-}" ]; then
  smollm2_with_mtp "$MTP_FROM" && model=/tmp/smollm2_mtp
  stages="stages=[{type: rlvr, name: rl}]"
fi
for loss in ${LOSSES:-frozen plain advantage dense}; do
  extra=""
  [ "$loss" = dense ] && extra="rollout.speculative.drafter=none" && l=frozen || l=$loss
  rm -rf /tmp/runs/mtp_$loss  # a warm machine's earlier run would be resumed
  python3 -m rlkit.cli train recipes/mtp_arithmetic.yaml model.path=$model algorithm.mtp.loss=$l \
    $extra run.name=mtp_$loss run.dir=/tmp/runs run.wandb=disabled run.progress_bar=false \
    train.steps=${STEPS:-30} train.eval_every=0 "$stages" \
    2>&1 | grep -v "Warning\|WARNING" | tail -6
  for f in summary.json metrics.jsonl config.yaml; do cp /tmp/runs/mtp_$loss/$f $OUT/mtp_${loss}_$f 2>/dev/null; done
done
ls /tmp/runs
