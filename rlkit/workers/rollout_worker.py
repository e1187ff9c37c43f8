"""The rollout worker: a copy of the policy inside the generation engine."""

from __future__ import annotations

from typing import Any

import torch

from rlkit import faults
from rlkit.config.schema import RolloutConfig
from rlkit.models.loading import DTYPES, load_model
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams
from rlkit.rollout.vllm_engine import VLLMEngine
from rlkit.workers import heap


class RolloutWorker:
    engine: Engine | VLLMEngine

    def __init__(self, model_path: str, cfg: RolloutConfig, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self._calls = 0
        if cfg.engine == "vllm":
            # vLLM runs in its own environment and process (rollout/vllm_engine.py).
            if cfg.kv_compression.policy != "none":
                raise ValueError("rollout.kv_compression needs rollout.engine: native")
            self.engine = VLLMEngine(
                model_path, cfg.vllm, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size
            )
            return
        dtype = DTYPES[cfg.dtype]
        model, tokenizer = load_model(model_path, dtype=dtype)
        model.eval()
        self.engine = Engine(
            model,
            tokenizer,
            max_batch_size=cfg.max_batch_size,
            dtype=dtype,
            kv_compression=cfg.kv_compression,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1, compress: bool = True
    ) -> list[dict[str, Any]]:
        """compress=False: a dense cache for this call even under rollout.kv_compression."""
        if isinstance(self.engine, Engine):
            completions = self.engine.generate(prompts, params, n=n, compress=compress)
            # Learning comes next: its peak should not include an idle KV cache.
            self.engine.release_cache()
        else:
            completions = self.engine.generate(prompts, params, n=n)
        heap.trim()
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

    def generate_with_stats(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1, compress: bool = True
    ) -> dict[str, Any]:
        """`generate` and the engine's `stats` of it in one call (what `RolloutGroup` asks)."""
        self._calls += 1
        faults.point("rollout.generate", self._calls)
        completions = self.generate(prompts, params, n, compress)
        return {"completions": completions, "stats": self.stats()}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(state_dict)
        del state_dict
        heap.trim()

    def stats(self) -> dict[str, float]:
        """The engine's figures of the last `generate` (KV bytes; see `Engine`), if any."""
        return dict(getattr(self.engine, "stats", {}))
