"""Turn the recipe's data section into samples and chat-templated prompt token ids.

`load_raw` reads the files (or builds the built-in task's splits) without a tokenizer, so a
data error is reported before the run directory, the model or Ray; `load_split` then drops
over-long prompts and tokenizes.
"""

from __future__ import annotations

from typing import Any

from rlkit.config import apply_overrides, config_error
from rlkit.config.schema import RecipeConfig
from rlkit.data.loaders import DataError, drop_long_prompts, load_samples, load_sft_pairs
from rlkit.data.tasks import get_task

SPLITS = ("train", "eval")


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
        raise config_error(
            cfg,
            "data.task",
            f"is null and data.{split}_files is empty: the recipe names no {split} data",
        )
    n = cfg.data.num_train if split == "train" else cfg.data.num_eval
    try:
        return get_task(cfg.data.task).build(split, n, cfg.data.seed, **cfg.data.task_args)
    except ValueError as e:
        key = "data.num_train" if split == "train" else "data.num_eval"
        raise config_error(cfg, key, f"the {split} split cannot be built: {e}") from None


def load_raw(cfg: RecipeConfig) -> dict[str, list[dict[str, Any]]]:
    """Every split's samples, and every SFT stage's files read once to check them."""
    raw = {split: raw_split(cfg, split) for split in SPLITS}
    for i, stage in enumerate(cfg.stages):
        if stage.type == "sft":
            staged = apply_overrides(cfg, stage.overrides, f"stages[{i}].overrides")
            for path in staged.sft.train_files:
                load_sft_pairs(path)
    return raw


def load_split(
    cfg: RecipeConfig, tokenizer, split: str, samples: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[list[int]], int]:
    """Samples, their prompt token ids, and how many were dropped for exceeding max_prompt_tokens.

    `samples`: the split as `load_raw` read it (None: read it here)."""
    from rlkit.models.tokenizer import apply_chat

    samples = raw_split(cfg, split) if samples is None else samples
    ids = {id(s): apply_chat(tokenizer, s["prompt"]) for s in samples}
    kept, dropped = drop_long_prompts(
        samples, lambda s: len(ids[id(s)]), cfg.data.max_prompt_tokens
    )
    if samples and not kept:
        files = cfg.data.train_files if split == "train" else cfg.data.eval_files
        source = ", ".join(files) if files else f"task {cfg.data.task!r}"
        raise DataError(
            f"{source}: all {len(samples)} {split} prompts are longer than "
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} tokens: the {split} set is empty"
        )
    return kept, [ids[id(s)] for s in kept], dropped
