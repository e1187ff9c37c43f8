"""What a stage needs from the run: config, data, actors, metrics, checkpoints.

The driver owns this object; stages (`rlvr.py`, `sft.py`) read like the algorithm and call
its methods for anything that crosses a process boundary.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from rlkit import faults
from rlkit.config.schema import RecipeConfig
from rlkit.data.stream import PromptStream
from rlkit.trainer import checkpoint
from rlkit.trainer.evaluate import accuracy_metrics
from rlkit.trainer.metrics import MetricsLogger
from rlkit.trainer.timer import PhaseTimer
from rlkit.workers.learner_group import LearnerGroup
from rlkit.workers.restarting import RestartingActor
from rlkit.workers.rollout_group import RolloutGroup


@dataclass
class StageSpec:
    index: int
    name: str
    type: str
    cfg: RecipeConfig


@dataclass
class RunContext:
    cfg: RecipeConfig  # the current stage's config (recipe + the stage's overrides)
    run_dir: str
    learner: LearnerGroup  # the learner ranks (train.num_learners), or the colocated worker
    rollout: RolloutGroup  # the rollout workers (rollout.num_workers), restarted when one dies
    reward: RestartingActor  # the RewardPool actor, restarted when it dies
    tokenizer: Any
    train_samples: list[dict[str, Any]]
    train_prompt_ids: list[list[int]]
    eval_samples: list[dict[str, Any]]
    eval_prompt_ids: list[list[int]]
    stream: PromptStream  # the current stage's order over its items, saved in checkpoints
    logger: MetricsLogger
    # The SFT stage's (prompt ids, response ids) pairs; None in RL stages.
    sft_examples: list[tuple[list[int], list[int]]] | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    summary: dict[str, Any] = field(default_factory=dict)
    # More held-out metrics, merged into every evaluation (e.g. JudgeRLVR's eval/judge_accuracy).
    eval_hooks: list[Callable[[], dict[str, float]]] = field(default_factory=list)
    # The dtype the rollout worker resolved `rollout.dtype` to on its machine ("auto" there);
    # weights are cast to it before they travel.
    rollout_dtype: str = "float32"
    # Learner and rollout engine in one actor (`learner` and `rollout` are the same handle):
    # the sync is a copy inside it.
    colocated: bool = False
    # Where the run is, for an interrupted run's message and the fault-injection points.
    stage: StageSpec | None = None
    step: int = 0
    # Holds a Ctrl-C back over a checkpoint's commit (`StopSignals.deferred`).
    deferred: Callable[[], AbstractContextManager[None]] = nullcontext
    # Training seconds of earlier attempts (from the checkpoint), and when this attempt's began.
    train_seconds_before: float = 0.0
    train_started_at: float | None = None

    @staticmethod
    def call(method, *args, **kwargs):
        return ray.get(method.remote(*args, **kwargs))

    def at(self, stage: StageSpec, step: int) -> None:
        """Note the step the run is working on (1-based; 0 before the first)."""
        self.stage, self.step = stage, step

    def where(self) -> str:
        """Where the run is: the phase running now and the step, e.g. "rollout of stage 0
        (rlvr) step 3" (after an error: the phase it escaped from)."""
        phase = self.timer.current or self.timer.failed_in or "between phases"
        if self.stage is None:
            return f"{phase} (before the first step)"
        return f"{phase} of stage {self.stage.index} ({self.stage.name}) step {self.step}"

    def generate(
        self,
        prompts: list[list[int]],
        params,
        n: int,
        compress: bool = True,
        drafter: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.rollout.generate(prompts, params, n, compress, drafter)

    def rollout_stats(self) -> dict[str, float]:
        """The rollout engines' figures for their last generate (KV bytes; Sparse-RL
        compression) under rollout/; figures already named with a prefix (spec/: speculative)
        as they are."""
        stats = self.rollout.stats()
        return {(k if "/" in k else f"rollout/{k}"): float(v) for k, v in stats.items()}

    def score(self, completions: list[str], samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.reward.call("score", completions, samples)

    def sync_weights(self, only: str | None = None) -> dict[str, float]:
        """Learner → rollout engine(s); only="mtp": the MTP module's weights alone (the MTP
        warm-up changes nothing else). Colocated: a device-to-device copy inside the one actor
        (timed: {"sync/ms": ...}). Else the weights travel learner → object store → rollout
        workers without touching the driver."""
        if self.colocated:
            return {"sync/ms": self.learner.sync_engine(only)}
        self.rollout.sync_from(self.learner, self.rollout_dtype, only)
        return {}

    def train_seconds(self) -> float:
        """Training time of the whole run: earlier attempts' (to their last checkpoint) + this one's."""
        now = time.perf_counter()
        return self.train_seconds_before + now - (self.train_started_at or now)

    def evaluate(self) -> dict[str, float]:
        from rlkit.rollout.sampling import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            stop=list(self.cfg.rollout.stop),
        )
        # The model as deployed: dense attention, even when rollouts use a compressed cache.
        metrics = self._greedy_accuracy(params, compress=False, prefix="eval")
        faults.point("eval", self.step)
        if self.cfg.rollout.kv_compression.policy != "none" and self.cfg.eval.sparse_too:
            metrics.update(self._greedy_accuracy(params, compress=True, prefix="eval_sparse"))
        for hook in self.eval_hooks:
            metrics.update(hook())
        return metrics

    def _greedy_accuracy(self, params, compress: bool, prefix: str) -> dict[str, float]:
        outs = self.generate(self.eval_prompt_ids, params, 1, compress)
        scored = self.score([c["text"] for c in outs], self.eval_samples)
        return accuracy_metrics(
            scored["scores"], [len(c["token_ids"]) for c in outs], prefix=prefix
        )

    def log(self, row: dict[str, Any]) -> None:
        self.logger.log(row)

    def end_step(self, stage: StageSpec, step: int, row: dict[str, Any]) -> None:
        """What every stage does after its update: sync, periodic eval, log, checkpoint."""
        train = self.cfg.train
        with self.timer.phase("sync"):
            row.update(self.sync_weights())
        if train.eval_every and step % train.eval_every == 0 and step != train.steps:
            with self.timer.phase("eval"):
                row.update(self.evaluate())
        row.update(self.timer.pop())
        self.log(row)
        faults.point("logged", step)
        # Training time from the first step to the end of this one: what the run took to
        # train, without the checkpoint written after its last step (train_seconds has it).
        self.summary["steps_seconds"] = self.train_seconds()
        if step == train.steps or (train.save_every and step % train.save_every == 0):
            self.save_checkpoint(stage, step)

    def save_checkpoint(self, stage: StageSpec, step: int) -> str:
        with self.timer.phase("checkpoint", timed=False):
            tmp, final = checkpoint.begin(self.run_dir, stage.index, stage.name, step)
            self.learner.save(tmp)
            faults.point("checkpoint", step)
            self.summary["train_seconds"] = self.train_seconds()
            state = {
                "stage_index": stage.index,
                "stage_name": stage.name,
                "step": step,
                "data": self.stream.state(),
                "rng": _rng_state(),
                "summary": self.summary,
                # Rows logged so far: a resumed run keeps exactly these (`truncate_metrics`).
                "metrics_rows": self.logger.rows,
            }
            with self.deferred():
                checkpoint.commit(tmp, final, state, keep=self.cfg.train.keep_checkpoints)
        faults.point("checkpointed", step)
        return final

    def restore(self, ref: checkpoint.CheckpointRef) -> dict[str, Any]:
        state = checkpoint.read_state(ref.path)
        self.learner.load(ref.path)
        self.sync_weights()
        self.stream.load_state(state["data"])
        _set_rng_state(state["rng"])
        self.summary.update(state.get("summary", {}))
        return state


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def truncate_metrics(path: str, rows: int) -> None:
    """Keep the first `rows` rows: those logged before the checkpoint a run resumes from (0:
    a run resumed without a checkpoint starts over). Rows logged after it, whatever their
    step (a final evaluation's row has its stage's last step), would be logged again."""
    if not os.path.exists(path):
        return
    kept: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(kept) == rows:
                break
            if line.strip():
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
