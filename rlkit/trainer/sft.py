"""The SFT stage: cross-entropy on prompt/response pairs, as a warm start before RL."""

from __future__ import annotations

from typing import Any

from rlkit.data.batch import RolloutBatch
from rlkit.data.loaders import load_sft_pairs
from rlkit.data.tasks import get_task
from rlkit.models.tokenizer import apply_chat
from rlkit.trainer.context import RunContext, StageSpec


def sft_examples(ctx: RunContext) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs: the recipe's SFT files, else the task's reference answers."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    eos = tok.eos_token_id
    pairs: list[tuple[Any, str]]
    if cfg.sft.train_files:
        pairs = [
            (p["prompt"], p["response"])
            for path in cfg.sft.train_files
            for p in load_sft_pairs(path)
        ]
        prompt_ids = [apply_chat(tok, p) for p, _ in pairs]
    else:
        task = get_task(cfg.data.task) if cfg.data.task else None
        if task is None:
            raise ValueError(
                "the sft stage needs sft.train_files or a built-in data.task with reference answers"
            )
        pairs = [(s["prompt"], task.reference(s)) for s in ctx.train_samples]
        prompt_ids = ctx.train_prompt_ids
    out = []
    for ids, (_, response) in zip(prompt_ids, pairs):
        resp = tok(response, add_special_tokens=False)["input_ids"]
        if eos is not None:
            resp = resp + [eos]
        out.append((ids, resp))
    return out


def run_sft(ctx: RunContext, stage: StageSpec, start_step: int) -> None:
    cfg = ctx.cfg
    examples = sft_examples(ctx)
    bs = cfg.sft.batch_size
    for step in range(start_step + 1, cfg.train.steps + 1):
        row: dict[str, Any] = {"stage": stage.name, "stage_index": stage.index, "step": step}
        with ctx.timer.phase("learn"):
            idx = ctx.stream.take(bs)
            chosen = [examples[i % len(examples)] for i in idx]
            batch = RolloutBatch.from_sequences(
                [p for p, _ in chosen],
                [r for _, r in chosen],
                [[0.0] * len(r) for _, r in chosen],
                [0.0] * len(chosen),
                list(range(len(chosen))),
            )
            row.update(ctx.call(ctx.learner.sft_step, batch))
        with ctx.timer.phase("sync"):
            ctx.sync_weights()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            with ctx.timer.phase("eval"):
                row.update(ctx.evaluate())
        row.update(ctx.timer.pop())
        ctx.log(row)
        if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            ctx.save_checkpoint(stage, step)
