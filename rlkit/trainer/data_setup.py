"""Turn the recipe's data section into samples and chat-templated prompt token ids."""

from __future__ import annotations

from typing import Any

from rlkit.config.schema import RecipeConfig
from rlkit.data.loaders import drop_long_prompts, load_samples
from rlkit.data.tasks import get_task
from rlkit.models.tokenizer import apply_chat


def verifier_spec(cfg: RecipeConfig) -> str:
    """The recipe's verifier, else the built-in task's default one."""
    if cfg.reward.verifier:
        return cfg.reward.verifier
    if cfg.data.task:
        return get_task(cfg.data.task).default_verifier
    raise ValueError(
        "reward.verifier is not set and data.task is null: name a verifier for your data files"
    )


def raw_split(cfg: RecipeConfig, split: str) -> list[dict[str, Any]]:
    files = cfg.data.train_files if split == "train" else cfg.data.eval_files
    if files:
        return [s for path in files for s in load_samples(path)]
    if not cfg.data.task:
        raise ValueError(
            f"data.{split}_files is empty and data.task is null: the recipe names no {split} data"
        )
    n = cfg.data.num_train if split == "train" else cfg.data.num_eval
    return get_task(cfg.data.task).build(split, n, cfg.data.seed, **cfg.data.task_args)


def load_split(
    cfg: RecipeConfig, tokenizer, split: str
) -> tuple[list[dict[str, Any]], list[list[int]], int]:
    """Samples, their prompt token ids, and how many were dropped for exceeding max_prompt_tokens."""
    samples = raw_split(cfg, split)
    ids = {id(s): apply_chat(tokenizer, s["prompt"]) for s in samples}
    kept, dropped = drop_long_prompts(
        samples, lambda s: len(ids[id(s)]), cfg.data.max_prompt_tokens
    )
    return kept, [ids[id(s)] for s in kept], dropped
