"""The rollout worker: a copy of the policy inside the generation engine."""

from __future__ import annotations

from typing import Any

import torch

from rlkit import faults
from rlkit.config.schema import RolloutConfig
from rlkit.device import pick_dtype, slow_dtype_warning
from rlkit.models.loading import load_model
from rlkit.models.mtp import init_mtp, load_mtp
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams
from rlkit.rollout.vllm_engine import VLLMEngine
from rlkit.workers import heap, weight_wire


class RolloutWorker:
    engine: Engine | VLLMEngine

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        num_threads: int | None = None,
        device: str = "cpu",
        release_cache: bool = True,
        mtp_seed: int | None = None,
    ) -> None:
        """device: where the engine computes (the run's placement decides it).
        release_cache: drop the KV cache after each rollout, so that it does not sit through
        the learner's step (a CPU's memory peak); a GPU worker that shares its device with a
        learner decides per rollout instead (`ColocatedWorker`), since a kept cache keeps its
        captured CUDA graphs.
        mtp_seed: the run has an MTP module (`rlkit.models.mtp.wanted`): the one saved beside
        the checkpoint, else a fresh one from this seed (the learner's twin)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.release_cache = release_cache
        choice = pick_dtype(cfg.dtype, self.device)
        self.dtype = choice.name
        warning = slow_dtype_warning(choice.dtype, self.device, "rollout.dtype")
        if warning and cfg.dtype != "auto":
            print(f"rlkit: warning: {warning}", flush=True)
        self._calls = 0
        if cfg.engine == "vllm":
            # vLLM runs in its own environment and process (rollout/vllm_engine.py), on the
            # device its own build targets.
            if cfg.kv_compression.policy != "none":
                raise ValueError("rollout.kv_compression needs rollout.engine: native")
            self.engine = VLLMEngine(
                model_path, cfg.vllm, dtype=choice.dtype, max_batch_size=cfg.max_batch_size
            )
            print(f"rlkit rollout: vLLM, {choice.name} ({choice.why})", flush=True)
            return
        model, tokenizer = load_model(model_path, dtype=choice.dtype)
        model = model.to(self.device).eval()
        mtp = None
        if mtp_seed is not None:
            mtp = load_mtp(model_path, model.args) or init_mtp(model.args, mtp_seed)
        self.engine = Engine(
            model,
            tokenizer,
            max_batch_size=cfg.max_batch_size,
            dtype=choice.dtype,
            kv_compression=cfg.kv_compression,
            speculative=cfg.speculative,
            mtp=mtp,
            kv_memory_gb=cfg.kv_memory_gb,
            kv_memory_fraction=cfg.kv_memory_fraction,
        )
        print(f"rlkit rollout: {self.engine.describe()} ({choice.why})", flush=True)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> list[dict[str, Any]]:
        """compress=False: a dense cache for this call even under rollout.kv_compression;
        drafter: this call's speculative drafter instead of rollout.speculative's."""
        if isinstance(self.engine, Engine):
            completions = self.engine.generate(
                prompts, params, n=n, compress=compress, drafter=drafter
            )
            # Learning comes next: its peak should not include an idle KV cache.
            if self.release_cache:
                self.engine.release_cache()
        else:
            completions = self.engine.generate(prompts, params, n=n)
        heap.trim(self.device)
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

    def set_draft_corpus(self, texts: list[list[int]]) -> None:
        """SAM drafts also from these token lists (rollout.speculative.sam_static)."""
        if isinstance(self.engine, Engine):
            self.engine.set_static_corpus(texts)

    def weights_dtype(self) -> str:
        """The dtype name `rollout.dtype` resolved to here: what weights should arrive in."""
        return self.dtype

    def load_packed_weights(self, packed: dict[str, Any]) -> None:
        """Weights as `weight_wire.pack` sent them (read in place from the object store)."""
        self.load_weights(weight_wire.unpack(packed))

    def generate_with_stats(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> dict[str, Any]:
        """`generate` and the engine's `stats` of it in one call (what `RolloutGroup` asks)."""
        self._calls += 1
        faults.point("rollout.generate", self._calls)
        completions = self.generate(prompts, params, n, compress, drafter)
        return {"completions": completions, "stats": self.stats()}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(state_dict)
        del state_dict
        heap.trim(self.device)

    def stats(self) -> dict[str, float]:
        """The engine's figures of the last `generate` (KV bytes; see `Engine`), if any."""
        return dict(getattr(self.engine, "stats", {}))
