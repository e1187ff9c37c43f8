"""The RLVR stage: generate → reward → advantages → learn → sync, one named phase at a time."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from rlkit import faults
from rlkit.algorithms import ADVANTAGES, filter_groups
from rlkit.config.schema import RecipeConfig
from rlkit.data.batch import RolloutBatch
from rlkit.rollout.sampling import SamplingParams
from rlkit.trainer.context import RunContext, StageSpec
from rlkit.trainer.prefetch import Prefetch
from rlkit.trainer.timer import PhaseTimer


class Round(NamedTuple):
    outs: list[dict[str, Any]]
    sample_of: list[int]  # training-sample index of each completion
    rewards: torch.Tensor  # [n_outs]
    keep: torch.Tensor  # [n_outs] bool: survives dynamic sampling
    scored: dict[str, Any]


def sampling_params(cfg: RecipeConfig, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=list(r.stop),
        seed=seed,
    )


class TaskSource:
    """What an RL stage trains on: item prompts, which items come next, how completions score.

    This one is the task's train split scored by its verifier (the rlvr / generate stages);
    `trainer/judge.py` subclasses it for the judge stage. Items are indices into `prompt_ids`.
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.prompt_ids: list[list[int]] = ctx.train_prompt_ids

    def start_step(self, step: int) -> None:
        """Called before each step's rollouts."""

    def take(self, k: int) -> list[int]:
        return self.ctx.stream.take(k)

    def sampling(self, cfg: RecipeConfig, seed: int) -> SamplingParams:
        return sampling_params(cfg, seed)

    def score(self, texts: list[str], items: list[int]) -> dict[str, Any]:
        """{"scores", "extras", "metrics"}, as `RewardPool.score` returns them."""
        return self.ctx.score(texts, [self.ctx.train_samples[i] for i in items])

    def step_metrics(self) -> dict[str, float]:
        """Extra metrics for the step's row, after its rollouts were scored."""
        return {}


def _rollout(
    ctx: RunContext, prompt_idx: list[int], seed: int, source: TaskSource | None = None
) -> tuple[list[dict[str, Any]], list[int]]:
    """Generate n samples per prompt; returns completions and the sample index of each."""
    source = source or TaskSource(ctx)
    n = ctx.cfg.rollout.n
    prompts = [source.prompt_ids[i] for i in prompt_idx]
    outs = ctx.generate(prompts, source.sampling(ctx.cfg, seed), n)
    sample_of = [prompt_idx[c["prompt_index"]] for c in outs]
    return outs, sample_of


def _response_metrics(outs: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    lengths = torch.tensor([len(c["token_ids"]) for c in outs], dtype=torch.float32)
    truncated = sum(c["finish_reason"] == "length" for c in outs)
    return {
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": truncated / len(outs),
        "throughput/rollout_tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
    }


def _collect(
    ctx: RunContext, seed: int, source: TaskSource | None = None, timer: PhaseTimer | None = None
) -> tuple[list[Round], dict[str, float]]:
    """Rollout and reward rounds until the batch has prompts_per_step informative groups.

    Without dynamic sampling this is one round. With it (DAPO), groups whose rewards are all
    equal carry no signal and are dropped; the batch is refilled with fresh prompts.
    `timer`: the phases' timer (the run's, or a look-ahead thread's own).
    """
    cfg = ctx.cfg
    timer = timer or ctx.timer
    source = source or TaskSource(ctx)
    n = cfg.rollout.n
    rounds: list[Round] = []
    pending = source.take(cfg.train.prompts_per_step)
    kept_groups = filtered_groups = 0
    outs_all: list[dict[str, Any]] = []
    kv_stats: list[dict[str, float]] = []
    while pending:
        with timer.phase("rollout"):
            outs, sample_of = _rollout(ctx, pending, seed + 7919 * len(rounds), source)
            faults.point("rollout", ctx.step)
        kv_stats.append(ctx.rollout_stats())
        with timer.phase("reward"):
            scored = source.score([c["text"] for c in outs], sample_of)
            faults.point("reward", ctx.step)
        rewards = torch.tensor(scored["scores"], dtype=torch.float32)
        keep = torch.ones(len(outs), dtype=torch.bool)
        if cfg.algorithm.dynamic_sampling:
            keep = filter_groups(rewards, torch.tensor(sample_of, dtype=torch.long))
        rounds.append(Round(outs, sample_of, rewards, keep, scored))
        outs_all.extend(outs)
        kept_groups += int(keep.sum()) // n
        filtered_groups += (len(outs) - int(keep.sum())) // n
        short = cfg.train.prompts_per_step - kept_groups
        if (
            not cfg.algorithm.dynamic_sampling
            or short <= 0
            or len(rounds) > cfg.algorithm.max_refill_rounds
        ):
            break
        pending = source.take(short)
    metrics = _response_metrics(outs_all, timer.seconds.get("rollout", 0.0))
    # KV figures per round: peaks and event counts over the rounds, the rest averaged.
    for k in kv_stats[0] if kv_stats else ():
        vals = [st[k] for st in kv_stats if k in st]
        if k.endswith("_peak") or k.endswith("_max") or "_peak_" in k:
            metrics[k] = max(vals)
        elif k.endswith("_events"):
            metrics[k] = sum(vals)
        else:
            metrics[k] = sum(vals) / len(vals)
    metrics["rollout/rounds"] = len(rounds)
    metrics["rollout/filtered_groups"] = filtered_groups
    return rounds, metrics


def run_rlvr(
    ctx: RunContext, stage: StageSpec, start_step: int, source: TaskSource | None = None
) -> None:
    """The stage's steps. With `train.async_mode: one_step_off` the rollouts of step t+1 run
    (in a `Prefetch` thread) while the learner trains step t, sampled by the weights after step
    t-1: staleness 1, reported per step as `async/staleness` beside `async/weight_version`
    (the policy version, in updates of this stage, that sampled the batch), and corrected by
    the learner's TIS / Sparse-RL ratios. A step that checkpoints starts no look-ahead, so the
    step after it samples from its weights (staleness 0) and a resumed run matches an
    uninterrupted one."""
    cfg, timer = ctx.cfg, ctx.timer
    source = source or TaskSource(ctx)
    advantage_fn = ADVANTAGES.get(cfg.algorithm.advantage)
    train = cfg.train
    one_step_off = train.async_mode == "one_step_off"
    ctx.rollout.keep_weights = one_step_off
    # Policy versions: the learner's updates in this stage so far, and those in the weights
    # the rollout workers hold (both synced at the stage's start, or by the restore).
    rollout_version = start_step
    ahead: Prefetch | None = None
    for step in range(start_step + 1, train.steps + 1):
        ctx.at(stage, step)
        row: dict[str, Any] = {"stage": stage.name, "stage_index": stage.index, "step": step}
        if ahead is not None:
            (rounds, rollout_metrics), sampled = ahead.result(), ahead.version
            row.update({f"async/{k}_s": v for k, v in ahead.timer.seconds.items()})
        else:
            source.start_step(step)
            rounds, rollout_metrics = _collect(ctx, _seed(cfg, stage, step), source)
            sampled = rollout_version
        row.update(rollout_metrics)
        row.update(source.step_metrics())
        with timer.phase("advantage"):
            batch, reward_metrics = _build_batch(ctx, rounds, source)
            batch.advantages = advantage_fn(batch.rewards, batch.group_ids, batch.response_mask)
        row.update(reward_metrics)
        row["async/weight_version"] = float(sampled)
        row["async/staleness"] = float(step - 1 - sampled)
        with timer.phase("learn"):
            pending = ctx.learner.submit_train_step(batch)
            ahead = None
            saves = step == train.steps or (train.save_every and step % train.save_every == 0)
            if one_step_off and not saves:
                nxt = step + 1

                def collect(own: PhaseTimer, nxt: int = nxt) -> Any:
                    source.start_step(nxt)
                    return _collect(ctx, _seed(cfg, stage, nxt), source, own)

                ahead = Prefetch(collect, rollout_version)
            row.update(pending.result())
            faults.point("learn", step)
        if ahead is not None:
            # The look-ahead samples with the weights it started with: the sync waits for it.
            with timer.phase("wait_rollout"):
                ahead.result()
        ctx.end_step(stage, step, row)
        rollout_version = step


def _seed(cfg: RecipeConfig, stage: StageSpec, step: int) -> int:
    """Rollouts are a function of (seed, stage, step), so a resumed run samples what the
    uninterrupted run would have."""
    return cfg.train.seed * 1_000_003 + stage.index * 100_003 + step


def _build_batch(
    ctx: RunContext, rounds: list[Round], source: TaskSource | None = None
) -> tuple[RolloutBatch, dict[str, float]]:
    cfg = ctx.cfg
    source = source or TaskSource(ctx)
    if not any(bool(rd.keep.any()) for rd in rounds):
        # Every group was filtered out: keep the last round so the step still runs (with zero
        # advantages it leaves the weights unchanged) and the metrics say so.
        rounds = [*rounds[:-1], rounds[-1]._replace(keep=torch.ones_like(rounds[-1].keep))]
    prompts, responses, logps, rewards, gids, loss_mask = [], [], [], [], [], []
    reward_stats: dict[str, list[float]] = {}
    for outs, sample_of, r, keep, scored in rounds:
        for k, v in scored["metrics"].items():
            reward_stats.setdefault(k, []).append(float(v))
        for j, c in enumerate(outs):
            if not keep[j]:
                continue
            prompts.append(source.prompt_ids[sample_of[j]])
            responses.append(c["token_ids"])
            logps.append(c["logprobs"])
            rewards.append(float(r[j]))
            gids.append(sample_of[j])
            masked = cfg.algorithm.overlong == "mask" and c["finish_reason"] == "length"
            loss_mask.append(not masked)
    batch = RolloutBatch.from_sequences(prompts, responses, logps, rewards, gids, loss_mask)
    every = torch.cat([rd.rewards for rd in rounds])
    metrics = {
        "reward/mean": float(every.mean()),
        "reward/std": float(every.std()) if every.numel() > 1 else 0.0,
        "train/accuracy": float((every >= 1.0).float().mean()),
    }
    # Counts and seconds add up across refill rounds; means are averaged.
    for k, vals in reward_stats.items():
        additive = k.endswith("_count") or k.endswith("time_s")
        metrics[f"reward/{k}"] = sum(vals) if additive else sum(vals) / len(vals)
    return batch, metrics
