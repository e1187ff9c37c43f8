"""Where actors go, on which device, and how many threads each gets: the one place that
decides placement. Actors take their device from here; nothing below re-derives it.

- device=cpu: `train.num_learners` learner actors and `rollout.num_workers` rollout actors.
  Rollout and learning alternate in the synchronous loop, so on a small machine the learner
  ranks share every core as torch threads, and so do the rollout workers, while Ray's CPU
  reservations are fractional. One-step-off training (`train.async_mode`) runs both at once:
  each side gets half the cores.
- device=cuda, one learner and one rollout worker: one colocated actor holding both on one GPU
  (`rlkit/workers/colocated.py`), which asks Ray for that GPU, so a cluster places it on a
  node that has one. More learner ranks or rollout workers: one GPU each.
- `ray.actor_resources`: custom Ray resources each actor of a role asks for, so a cluster
  puts it on a node that offers them (`ray start --resources=...`).
- device=auto: cuda when the machine (or the Ray cluster) has a GPU, else cpu; the driver
  says which at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from rlkit.config.schema import RecipeConfig

Role = Literal["learner", "rollout", "reward"]


class PlacementError(Exception):
    """The recipe's placement cannot be met here (a user-facing, one-line error)."""


@dataclass
class Placement:
    device: str  # "cpu" | "cuda": every actor's
    why: str  # for the start-up line
    num_cpus: int  # CPUs Ray is started with (local mode)
    num_gpus: int  # GPUs Ray is started with (local mode)
    # Learner and rollout engine in one actor (one GPU, the phases alternating on it).
    colocated: bool
    learner_cpus: float
    rollout_cpus: float  # per rollout worker
    reward_cpus: float
    learner_gpus: float  # the colocated actor's GPUs when colocated
    rollout_gpus: float
    # Torch threads per actor. Rollout and learning alternate in the synchronous loop, so on a
    # small machine both may use every core without competing.
    learner_threads: int
    rollout_threads: int  # per rollout worker
    num_rollout_workers: int = 1
    num_learners: int = 1  # learner ranks (the colocated actor is one)
    # Custom Ray resources per role (`ray.actor_resources`).
    resources: dict[str, dict[str, float]] = field(default_factory=dict)

    def actor_options(self, role: Role) -> dict[str, Any]:
        """Ray's resource request for one actor of `role` (`ray.remote(**options)`): each
        learner rank, each rollout worker, the reward pool; the colocated actor is the
        learner's."""
        cpus = {"learner": self.learner_cpus, "rollout": self.rollout_cpus}
        gpus = {"learner": self.learner_gpus, "rollout": self.rollout_gpus}
        options: dict[str, Any] = {"num_cpus": cpus.get(role, self.reward_cpus)}
        if gpus.get(role):
            options["num_gpus"] = gpus[role]
        if self.resources.get(role):
            options["resources"] = dict(self.resources[role])
        return options


def plan(cfg: RecipeConfig, gpus: int) -> Placement:
    """Placement for `cfg` on a machine (or cluster) with `gpus` visible GPUs."""
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    n_roll = cfg.rollout.num_workers
    n_learn = cfg.train.num_learners
    device, why = _device(cfg.device, gpus)
    cuda = device == "cuda"
    colocated = cuda and n_roll == 1 and n_learn == 1
    overlap = cfg.train.async_mode != "off"
    if colocated and overlap:
        raise PlacementError(
            "train.async_mode: one_step_off needs rollout workers apart from the learner; on "
            "one GPU they share one actor, which runs one phase at a time (give the run a "
            "GPU more, or set train.async_mode=off)"
        )
    if cuda and not colocated and gpus < n_learn + n_roll:
        learners = f"{n_learn} learner rank{'s' if n_learn > 1 else ''}"
        raise PlacementError(
            f"rollout.num_workers: {n_roll} rollout workers beside {learners} need "
            f"{n_learn + n_roll} GPUs, {gpus} visible"
        )
    # Cores each side may use as threads: all of them when rollout and learning alternate,
    # half each when they overlap.
    side = max(1, cores // 2) if overlap else cores
    return Placement(
        device=device,
        why=why,
        num_cpus=cores,
        num_gpus=gpus,
        colocated=colocated,
        # Fractional reservations keep every actor schedulable on a 1- or 2-core machine.
        learner_cpus=min(1.0, cores / (2 * n_learn)),
        rollout_cpus=min(1.0, cores / (2 * n_roll)),
        reward_cpus=0.0,
        learner_gpus=1.0 if cuda else 0.0,
        # Rollout workers beside GPU learners share the remaining GPUs (one each).
        rollout_gpus=0.0 if not cuda or colocated else 1.0,
        learner_threads=max(1, side // n_learn),
        rollout_threads=max(1, side // n_roll),
        num_rollout_workers=n_roll,
        num_learners=n_learn,
        resources={k: dict(v) for k, v in cfg.ray.actor_resources.items()},
    )


def _device(spec: str, gpus: int) -> tuple[str, str]:
    if spec == "cpu":
        return "cpu", "device=cpu"
    if gpus < 1:
        if spec == "cuda":
            raise PlacementError(
                "device: is cuda but no CUDA GPU is visible to PyTorch/Ray here (a CPU-only "
                "torch build, or CUDA_VISIBLE_DEVICES); use device=cpu or device=auto"
            )
        return "cpu", "device=auto: no CUDA GPU here"
    return "cuda", f"device={spec}: {gpus} CUDA GPU(s) here"


def visible_gpus() -> int:
    """CUDA GPUs this process can use (0 without CUDA or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_device(spec: str) -> tuple[str, str]:
    """`device` (auto, cpu or cuda) for work in this process (`rlkit eval`, `rlkit bench`):
    the device and why; a PlacementError when cuda is asked for and there is none."""
    return _device(spec, visible_gpus() if spec != "cpu" else 0)
