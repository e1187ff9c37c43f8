"""Where actors go, on which device, and how many threads each gets: the one place that
decides placement. Actors take their device from here; nothing below re-derives it.

- device=cpu: a learner actor and a rollout actor. Rollout and learning alternate in the
  synchronous loop, so on a small machine each gets every core as torch threads while Ray's
  CPU reservations are fractional.
- device=cuda, one learner and one rollout worker: one colocated actor holding both on one GPU
  (`rlkit/workers/colocated.py`), which asks Ray for that GPU, so a cluster places it on a
  node that has one.
- device=auto: cuda when the machine (or the Ray cluster) has a GPU, else cpu; the driver
  says which at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    def actor_options(self, role: Role) -> dict[str, Any]:
        """Ray's resource request for one actor of `role` (`ray.remote(**options)`); the
        colocated actor is the learner's."""
        cpus = {"learner": self.learner_cpus, "rollout": self.rollout_cpus}
        gpus = {"learner": self.learner_gpus, "rollout": self.rollout_gpus}
        options: dict[str, Any] = {"num_cpus": cpus.get(role, self.reward_cpus)}
        if gpus.get(role):
            options["num_gpus"] = gpus[role]
        return options


def plan(cfg: RecipeConfig, gpus: int) -> Placement:
    """Placement for `cfg` on a machine (or cluster) with `gpus` visible GPUs."""
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    n_roll = cfg.rollout.num_workers
    device, why = _device(cfg.device, gpus)
    cuda = device == "cuda"
    colocated = cuda and n_roll == 1
    if cuda and not colocated and gpus < 1 + n_roll:
        raise PlacementError(
            f"rollout.num_workers: {n_roll} rollout workers beside a learner need "
            f"{1 + n_roll} GPUs, {gpus} visible"
        )
    return Placement(
        device=device,
        why=why,
        num_cpus=cores,
        num_gpus=gpus,
        colocated=colocated,
        # Fractional reservations keep every actor schedulable on a 1- or 2-core machine.
        learner_cpus=min(1.0, cores / 2),
        rollout_cpus=min(1.0, cores / (2 * n_roll)),
        reward_cpus=0.0,
        learner_gpus=1.0 if cuda else 0.0,
        # Rollout workers beside a GPU learner share the remaining GPUs (one each).
        rollout_gpus=0.0 if not cuda or colocated else 1.0,
        learner_threads=cores,
        rollout_threads=max(1, cores // n_roll),
        num_rollout_workers=n_roll,
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
