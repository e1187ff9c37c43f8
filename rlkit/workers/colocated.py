"""Learner and rollout engine in one process on one GPU (verl's hybrid engine, slime's
colocated mode): the phases alternate, so they hand the device to each other, and the weight
sync is a device-to-device copy inside the process, no host round trip and no IPC.

Why one process and not two actors sharing the GPU through CUDA IPC handles: measured on the
lent H200 (benchmarks/bench_sync.py, benchmarks/RESULTS.md "GPU weight sync"), the in-process
copy is the IPC route's consumer-side copy minus the handle exchange; and one process shares
one caching allocator, so the KV cache the engine frees is memory the learner reuses at once.

Memory hand-off: the engine keeps its KV cache (and the CUDA graphs captured over it) between
rollouts while the device has room for the learner's step beside it; when it does not (free
memory after a rollout under the learner's last peak), it frees the cache before the learner
runs. Each phase's peak device memory goes into the metrics row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from rlkit.config.schema import RecipeConfig
from rlkit.data.batch import RolloutBatch
from rlkit.device import synchronize
from rlkit.models.mtp import wanted as mtp_wanted
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams
from rlkit.workers.learner import Learner
from rlkit.workers.rollout_worker import RolloutWorker
from rlkit.workers.step_metrics import StepPart

_T = TypeVar("_T")

# Headroom kept free beyond the learner's last peak when deciding to keep the KV cache.
_MARGIN_BYTES = 1 << 30


def copy_into_engine(learner: Learner, engine: Engine) -> bool:
    """The learner's weights copied into the engine's parameters in place, cast on the way
    (the CUDA graphs read them where they are); False where that path does not apply (packed
    CPU weights, LoRA, FSDP2, an MTP module: `Learner.weights` serves those)."""
    if engine.model.prepacked:
        return False
    targets = engine.model.state_dict(keep_vars=True)
    if engine.model.args.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    return learner.copy_weights_into(targets)


class ColocatedWorker:
    def __init__(
        self,
        model_path: str,
        cfg: RecipeConfig,
        num_threads: int | None = None,
        device: str = "cuda",
    ) -> None:
        self.device = torch.device(device)
        self.learner = Learner(model_path, cfg, num_threads, device=device)
        self.rollout = RolloutWorker(
            model_path,
            cfg.rollout,
            num_threads,
            device=device,
            release_cache=False,
            mtp_seed=cfg.train.seed if mtp_wanted(cfg) else None,
        )
        self._learner_peak = 0  # bytes the learner's last step held (reserved)
        self._rollout_stats: dict[str, float] = {}

    # -- rollout side ----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> list[dict[str, Any]]:
        cuda = self.device.type == "cuda"
        if cuda:
            # The learner's freed activations go back to the device (the hand-off), and the
            # phase's peak counts what the rollout holds, not what the allocator kept cached.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        out = self.rollout.generate(prompts, params, n, compress, drafter)
        stats: dict[str, float] = {}
        if cuda:
            # rollout/gpu_peak_*: the metrics row's names (RunContext.rollout_stats prefixes).
            stats["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            stats["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            stats["kv_cache_released"] = float(self._make_room())
        self._rollout_stats = stats
        return out

    def generate_with_stats(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> dict[str, Any]:
        """`generate` and its stats in one call (what `RolloutGroup` asks of a worker)."""
        completions = self.generate(prompts, params, n, compress, drafter)
        return {"completions": completions, "stats": self.stats()}

    def _make_room(self) -> bool:
        """Free the engine's KV cache if the learner's next step might not fit beside it."""
        engine = self.rollout.engine
        if not isinstance(engine, Engine) or engine.cache is None or not self._learner_peak:
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        # What the learner can get: free device memory plus the allocator's unused reserve.
        room = free + (reserved - allocated)
        if room >= self._learner_peak + _MARGIN_BYTES:
            return False
        engine.release_cache()
        return True

    def stats(self) -> dict[str, float]:
        return {**self.rollout.stats(), **self._rollout_stats}

    def weights_dtype(self) -> str:
        return self.rollout.weights_dtype()

    def set_draft_corpus(self, texts: list[list[int]]) -> None:
        self.rollout.set_draft_corpus(texts)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Other weights into the engine (JudgeRLVR's extra checkpoints); `sync_engine` puts
        the policy's back."""
        self.rollout.load_weights(state_dict)

    def load_packed_weights(self, packed: dict[str, Any]) -> None:
        self.rollout.load_packed_weights(packed)

    # -- learner side ----------------------------------------------------------------------

    def configure(self, cfg: RecipeConfig) -> None:
        self.learner.configure(cfg)

    def _learn(self, step: Callable[[RolloutBatch], _T], batch: RolloutBatch) -> _T:
        """A learner step with the device handed over: the rollout's freed blocks go back
        first (the KV cache stays), and the step's peak is kept for `_make_room`."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        out = step(batch)
        if cuda:
            self._learner_peak = max(
                self._learner_peak, torch.cuda.max_memory_reserved(self.device)
            )
        return out

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self._learn(self.learner.train_step, batch)

    def train_step_part(self, batch: RolloutBatch) -> StepPart:
        return self._learn(self.learner.train_step_part, batch)

    def sft_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.learner.sft_step(batch)

    def sft_step_part(self, batch: RolloutBatch) -> StepPart:
        return self.learner.sft_step_part(batch)

    def mtp_step_part(self, batch: RolloutBatch) -> StepPart:
        return self.learner.mtp_step_part(batch)

    def weights(
        self, dtype: str = "bfloat16", device: str = "cpu", only: str | None = None
    ) -> dict[str, torch.Tensor]:
        return self.learner.weights(dtype, device, only)

    def packed_weights(
        self, dtype: str = "bfloat16", only: str | None = None
    ) -> dict[str, Any] | None:
        return self.learner.packed_weights(dtype, only)

    def mtp_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.learner.mtp_step(batch)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str, with_optimizer: bool = True) -> None:
        self.learner.load(path, with_optimizer)

    # -- the sync --------------------------------------------------------------------------

    @torch.no_grad()
    def sync_engine(self, only: str | None = None) -> float:
        """Copy the learner's weights (only="mtp": the MTP module's) into the engine on the
        device; returns milliseconds."""
        synchronize(self.device)
        t0 = time.perf_counter()
        engine = self.rollout.engine
        direct = (
            only is None and isinstance(engine, Engine) and copy_into_engine(self.learner, engine)
        )
        if not direct:
            state = self.learner.weights(self.rollout.weights_dtype(), str(self.device), only)
            engine.load_state_dict(state)
            del state
        synchronize(self.device)
        return 1000 * (time.perf_counter() - t0)
