"""N learner ranks behind the interface of one: the driver's loop is the same for any N.

`train.num_learners: N` starts N `Learner` actors (`rlkit/workers/learner.py`); rank 0 picks a
rendezvous address on its node and every rank joins the process group (gloo on CPU, NCCL on
GPU). A step's batch goes into the object store once and every rank reads it; each runs its
share of the micro-batches (`workers/distributed.py`), and the group merges the ranks' raw
sums into one learner's metrics (`step_metrics.finish`). Weights for the rollout sync come
from rank 0 (data parallel: every rank holds them) or are gathered from all ranks a tensor at
a time (FSDP2: every rank takes part, rank 0 packs them). Checkpoints: every rank saves and
loads (`Learner.save` / `load` say who writes what).

The one-GPU colocated worker (`workers/colocated.py`) is a group of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from rlkit.data.batch import RolloutBatch
from rlkit.workers.step_metrics import finish, finish_mtp, finish_sft


class PendingStep:
    """A learner step submitted to the ranks (`LearnerGroup.submit_train_step`)."""

    def __init__(self, refs: list[Any], combine: Callable[[list[Any]], dict[str, float]]):
        self.refs = refs
        self._combine = combine

    def done(self) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def result(self) -> dict[str, float]:
        return self._combine(ray.get(self.refs))


class LearnerGroup:
    def __init__(self, ranks: list[Any], sharded: bool = False) -> None:
        self.ranks = ranks
        self.sharded = sharded
        # FSDP2: the gather calls of ranks > 0 for the last weights handed out (kept until
        # the next, so nothing of theirs is dropped before it ran).
        self._gathers: list[Any] = []

    @classmethod
    def start(
        cls, make_rank: Callable[[int], Any], world: int, sharded: bool = False
    ) -> LearnerGroup:
        """Start `world` rank actors (`make_rank(r)`), then join them into one process group
        at the address rank 0 picks on its node."""
        ranks = [make_rank(r) for r in range(world)]
        if world > 1:
            address = ray.get(ranks[0].rendezvous.remote())
            ray.get([r.join.remote(address) for r in ranks])
        return cls(ranks, sharded and world > 1)

    def __len__(self) -> int:
        return len(self.ranks)

    @property
    def lead(self) -> Any:
        """Rank 0's actor (the colocated worker, on one GPU)."""
        return self.ranks[0]

    def actor_ids(self) -> set[str]:
        return {r._actor_id.hex() for r in self.ranks}

    def ready(self) -> None:
        ray.get([r.__ray_ready__.remote() for r in self.ranks])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    def _shared(self, batch: RolloutBatch) -> Any:
        """The batch as every rank receives it: one object-store copy for N > 1."""
        return ray.put(batch) if len(self.ranks) > 1 else batch

    def configure(self, cfg: Any) -> None:
        self._all("configure", cfg)

    def submit_train_step(self, batch: RolloutBatch) -> PendingStep:
        """Start one update on the ranks and return at once (one-step-off training overlaps
        it with the next rollout); `.result()` waits and gives the step's metrics."""
        ref = self._shared(batch)
        return PendingStep([r.train_step_part.remote(ref) for r in self.ranks], finish)

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.submit_train_step(batch).result()

    def sft_step(self, batch: RolloutBatch) -> dict[str, float]:
        return finish_sft(self._all("sft_step_part", self._shared(batch)))

    def mtp_step(self, batch: RolloutBatch) -> dict[str, float]:
        return finish_mtp(self._all("mtp_step_part", self._shared(batch)))

    def packed_weights_ref(self, dtype: str, only: str | None = None) -> Any:
        """An object-store ref of the policy's weights packed for the rollout workers
        (`Learner.packed_weights`): rank 0's; under FSDP2 every rank takes part in gathering
        them and rank 0's result is the ref."""
        refs = [
            r.packed_weights.remote(dtype, only)
            for r in (self.ranks if self.sharded else self.ranks[:1])
        ]
        self._gathers = refs[1:]
        return refs[0]

    def weights(self, dtype: str = "float32") -> dict[str, Any]:
        """The policy's full weights as tensors on the driver (tests, small models)."""
        from rlkit.workers import weight_wire

        return weight_wire.unpack(ray.get(self.packed_weights_ref(dtype)))

    def sync_engine(self, only: str | None = None) -> float:
        """Colocated (one GPU): the in-process copy into the engine, in milliseconds."""
        return float(ray.get(self.lead.sync_engine.remote(only)))

    def save(self, path: str) -> None:
        self._all("save", path)

    def load(self, path: str, with_optimizer: bool = True) -> None:
        self._all("load", path, with_optimizer)

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
