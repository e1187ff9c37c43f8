"""Where actors go and how many threads each gets: the one place that decides placement."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from rlkit.config.schema import RecipeConfig

Role = Literal["learner", "rollout", "reward"]


@dataclass
class Placement:
    num_cpus: int  # CPUs Ray is started with (local mode)
    learner_cpus: float
    rollout_cpus: float  # per rollout worker
    reward_cpus: float
    # Torch threads per actor. Rollout and learning alternate in the synchronous loop, so on a
    # small machine both may use every core without competing.
    learner_threads: int
    rollout_threads: int  # per rollout worker
    num_rollout_workers: int = 1

    def actor_options(self, role: Role) -> dict[str, Any]:
        """Ray's resource request for one actor of `role` (`ray.remote(**options)`)."""
        cpus = {"learner": self.learner_cpus, "rollout": self.rollout_cpus}
        return {"num_cpus": cpus.get(role, self.reward_cpus)}


def plan(cfg: RecipeConfig) -> Placement:
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    n_roll = cfg.rollout.num_workers
    return Placement(
        num_cpus=cores,
        # Fractional reservations keep every actor schedulable on a 1- or 2-core machine.
        learner_cpus=min(1.0, cores / 2),
        rollout_cpus=min(1.0, cores / (2 * n_roll)),
        reward_cpus=0.0,
        learner_threads=cores,
        rollout_threads=max(1, cores // n_roll),
        num_rollout_workers=n_roll,
    )
