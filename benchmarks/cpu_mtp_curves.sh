#!/usr/bin/env bash
# MTP-RL's learning curves on the CPU (issue 15), from the repository root: recipes/
# mtp_arithmetic.yaml's RL stage with each MTP loss (frozen, plain, advantage) and the dense
# baseline (rollouts without drafts), same seed, starting from a warmed MTP module:
#   MTP_DIR=<a model directory: SmolLM2's files and a warm-up's mtp.safetensors>
# Smaller steps than the recipe's (PROMPTS x N samples, default 4 x 4) so that 30 steps of
# each run fit in minutes on 2 cores; then `rlkit report` over the four runs (spec/accept_len
# over training) and a summary line per run. OUT (default runs/cpu_mtp_curves) holds them.
set -eu
: "${MTP_DIR:?MTP_DIR=<model directory with mtp.safetensors>}"
out=${OUT:-runs/cpu_mtp_curves}
mkdir -p "$out"
for loss in ${LOSSES:-frozen plain advantage dense}; do
  extra=""
  l=$loss
  if [ "$loss" = dense ]; then extra="rollout.speculative.drafter=none"; l=frozen; fi
  start=$(date +%s)
  rlkit train recipes/mtp_arithmetic.yaml model.path="$MTP_DIR" algorithm.mtp.loss=$l $extra \
    "stages=[{type: rlvr, name: rl}]" train.steps=${STEPS:-30} train.eval_every=0 \
    train.prompts_per_step=${PROMPTS:-4} rollout.n=${N:-4} data.num_eval=${EVAL:-64} \
    run.name=mtp_$loss run.dir="$out" run.wandb=disabled run.progress_bar=false \
    2>&1 | grep -v "Warning\|WARNING" | tail -5
  echo "== $loss: $(( $(date +%s) - start )) s"
done
rlkit report "$out"/mtp_frozen "$out"/mtp_plain "$out"/mtp_advantage "$out"/mtp_dense \
  --labels frozen plain advantage dense --out "$out"/report 2>&1 | tail -3
