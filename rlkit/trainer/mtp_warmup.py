"""MTP-RL's stage 0 (`stages: [{type: mtp_warmup}, ...]`): equip the policy with an MTP drafter
by self-distillation on its own samples.

Each step samples `rollout.n` completions of `train.prompts_per_step` train prompts from the
policy with plain decode steps (the drafter being trained is not yet worth its cost, and
verification is lossless, so drafting would change only the time), trains only the MTP module to predict them (`Learner.mtp_step`: plain cross-entropy,
the trunk unchanged) and sends the MTP weights to the rollout worker. At every
`train.eval_every` and at the end, held-out acceptance: speculative rollouts with the MTP
drafter (at the rollout temperature) on the first `algorithm.mtp.eval_prompts` eval prompts,
logged as mtp/heldout_accept_len (tokens per sequence and verify step) and
mtp/heldout_accept_rate. Checkpoints hold the module beside the trunk (`mtp.safetensors`), so
the stage's output is a checkpoint any later run loads with its drafter.
"""

from __future__ import annotations

from typing import Any

from rlkit.data.batch import RolloutBatch
from rlkit.data.tasks import get_task
from rlkit.trainer.context import RunContext, StageSpec
from rlkit.trainer.rlvr import sampling_params


def heldout_acceptance(ctx: RunContext) -> dict[str, float]:
    """Mean accepted length of the MTP drafter on held-out prompts (speculative rollouts)."""
    cfg = ctx.cfg
    prompts = ctx.eval_prompt_ids[: cfg.algorithm.mtp.eval_prompts]
    ctx.generate(prompts, sampling_params(cfg, cfg.train.seed), 1, drafter="mtp")
    stats = ctx.rollout_stats()
    return {
        "mtp/heldout_accept_len": stats["spec/accept_len_mean"],
        "mtp/heldout_accept_rate": stats["spec/accept_rate"],
    }


def static_corpus(ctx: RunContext) -> list[list[int]]:
    """Token ids of the train split's reference answers (the task's, else each sample's
    ground truth), for SAM's static automaton (`rollout.speculative.sam_static`)."""
    task = get_task(ctx.cfg.data.task) if ctx.cfg.data.task else None
    texts = [
        task.reference(s) if task is not None else str(s.get("ground_truth", ""))
        for s in ctx.train_samples
    ]
    return [ctx.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t]


def run_mtp_warmup(ctx: RunContext, stage: StageSpec, start_step: int) -> None:
    cfg, timer = ctx.cfg, ctx.timer
    train = cfg.train
    for step in range(start_step + 1, train.steps + 1):
        row: dict[str, Any] = {"stage": stage.name, "stage_index": stage.index, "step": step}
        seed = train.seed * 1_000_003 + stage.index * 100_003 + step
        idx = ctx.stream.take(train.prompts_per_step)
        prompts = [ctx.train_prompt_ids[i] for i in idx]
        with timer.phase("rollout"):
            outs = ctx.generate(prompts, sampling_params(cfg, seed), cfg.rollout.n, drafter="none")
        row.update(ctx.rollout_stats())
        lengths = [len(c["token_ids"]) for c in outs]
        row["response/length_mean"] = sum(lengths) / len(lengths)
        with timer.phase("learn"):
            batch = RolloutBatch.from_sequences(
                [prompts[c["prompt_index"]] for c in outs],
                [c["token_ids"] for c in outs],
                [c["logprobs"] for c in outs],
                [0.0] * len(outs),
                [idx[c["prompt_index"]] for c in outs],
            )
            row.update(ctx.learner.mtp_step(batch))
        with timer.phase("sync"):
            ctx.sync_weights(only="mtp")
        if step == train.steps or (train.eval_every and step % train.eval_every == 0):
            with timer.phase("eval"):
                heldout = heldout_acceptance(ctx)
            row.update(heldout)
            ctx.summary.setdefault("mtp_warmup", {})[stage.name] = heldout
        row.update(timer.pop())
        ctx.log(row)
        if step == train.steps or (train.save_every and step % train.save_every == 0):
            ctx.save_checkpoint(stage, step)
