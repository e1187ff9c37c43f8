"""Generation engine: KV cache, sampling, batched prefill/decode."""

from rlkit.rollout.engine import Completion, Engine
from rlkit.rollout.kv_cache import KVCache
from rlkit.rollout.sampling import SamplingParams, sample, sampling_logprobs

__all__ = ["Completion", "Engine", "KVCache", "SamplingParams", "sample", "sampling_logprobs"]
