"""The rollout worker: a copy of the policy inside the generation engine."""

from __future__ import annotations

from typing import Any

import torch

from rlkit.config.schema import RolloutConfig
from rlkit.models.loading import DTYPES, load_model
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams


class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutConfig, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        dtype = DTYPES[cfg.dtype]
        model, tokenizer = load_model(model_path, dtype=dtype)
        model.eval()
        self.engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size, dtype=dtype)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1
    ) -> list[dict[str, Any]]:
        completions = self.engine.generate(prompts, params, n=n)
        return [
            {
                "prompt_index": c.prompt_index,
                "token_ids": list(c.token_ids),
                "logprobs": list(c.logprobs),
                "finish_reason": c.finish_reason,
                "text": c.text,
            }
            for c in completions
        ]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(state_dict)
