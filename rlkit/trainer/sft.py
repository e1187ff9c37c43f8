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
    examples = ctx.sft_examples
    if examples is None:
        raise RuntimeError("run_sft needs ctx.sft_examples (set when the stage starts)")
    for step in range(start_step + 1, cfg.train.steps + 1):
        ctx.at(stage, step)
        row: dict[str, Any] = {"stage": stage.name, "stage_index": stage.index, "step": step}
        with ctx.timer.phase("learn"):
            chosen = [examples[i] for i in ctx.stream.take(cfg.sft.batch_size)]
            batch = RolloutBatch.from_sequences(
                [p for p, _ in chosen],
                [r for _, r in chosen],
                [[0.0] * len(r) for _, r in chosen],
                [0.0] * len(chosen),
                list(range(len(chosen))),
            )
            row.update(ctx.learner.sft_step(batch))
        ctx.end_step(stage, step, row)
