"""The reward pool: verifiers run in worker processes with a per-call timeout and sandbox.

A crashing, hung, over-limit or malformed verifier costs that sample's reward (0, counted in the
metrics by kind), never the run: `VerifierPool` kills a failed call's whole process tree and
replaces dead workers.

For the driver's fault tolerance: building a RewardPool is cheap (it imports the verifier and
starts its workers without waiting for them) and `score` keeps no state between calls, so a
driver whose RewardPool actor died can build a new one with the same arguments and send the
same batch again. When this actor's process dies, its workers see their socket close and kill
everything below them, so nothing a verifier started outlives it.
"""

from __future__ import annotations

from typing import Any

from rlkit.rewards.runner import VerifierPool
from rlkit.rewards.sandbox import Sandbox


class RewardPool:
    def __init__(
        self,
        spec: str,
        style: str,
        kwargs: dict[str, Any],
        num_workers: int,
        timeout_s: float,
        base_dir: str,
        sandbox: dict[str, Any] | None = None,
    ) -> None:
        self.pool = VerifierPool(
            spec,
            style,
            kwargs,
            num_workers,
            timeout_s,
            base_dir=base_dir,
            sandbox=Sandbox(**(sandbox or {})),
        )

    def score(self, completions: list[str], samples: list[dict[str, Any]]) -> dict[str, Any]:
        result = self.pool.score(completions, samples)
        return {
            "scores": list(result.scores),
            "extras": list(result.extras),
            "metrics": dict(result.metrics),
            # "sample i: ..." (at most 500 characters), or None when nothing failed.
            "first_error": result.first_error,
        }

    def close(self) -> None:
        self.pool.close()
