"""The reward pool: verifiers run in worker processes with a per-call timeout.

A crashing, hung or malformed verifier costs that sample's reward (0, counted in the metrics),
never the run: `VerifierPool` kills and replaces a stuck worker process.
"""

from __future__ import annotations

from typing import Any

from rlkit.rewards.runner import VerifierPool


class RewardPool:
    def __init__(
        self,
        spec: str,
        style: str,
        kwargs: dict[str, Any],
        num_workers: int,
        timeout_s: float,
        base_dir: str,
    ) -> None:
        self.pool = VerifierPool(spec, style, kwargs, num_workers, timeout_s, base_dir=base_dir)

    def score(self, completions: list[str], samples: list[dict[str, Any]]) -> dict[str, Any]:
        result = self.pool.score(completions, samples)
        return {
            "scores": list(result.scores),
            "extras": list(result.extras),
            "metrics": dict(result.metrics),
        }

    def close(self) -> None:
        self.pool.close()
