"""JudgeRLVR's judge stage (ALGORITHMS.md section 2), and held-out judge accuracy.

The judge stage is the RLVR loop of `rlvr.py` with another item source (`JudgeSource`): its
items are (problem, candidate solution) pairs, its prompts ask for a critique and a verdict,
and its reward is 1 when the verdict matches the verifier's label (`rlkit.data.judge`).

Judge sets. Before step `b + 1` of the stage, for b = 0, R, 2R, ... (R = `judge.refresh_every`;
R = 0: b = 0 only), `judge.num_problems` train problems get `judge.candidates_per_problem`
sampled solutions from the current policy (the rollout worker's weights) and as many from each
of `judge.extra_checkpoints`; the task's verifier labels them and `select_pairs` keeps the
balanced items. The set is cached as `<run>/judge/pairs_<i>_<stage>_<b>.jsonl` (plus a
`.stats.json`) and walked in a seeded order by the stage's `ctx.stream`, which the checkpoint
saves like any stage's data cursor. Everything that picks problems or samples candidates is a
function of (seeds, stage, b), so a resumed run reloads the cached set it was using, and a set
due exactly at the resume step is built again from the restored weights as the uninterrupted
run built it.

Extra checkpoints are sampled in the same rollout workers: their weights are pushed to them
(`RolloutGroup.load_weights`, one object-store ref), and the policy's weights are synced back
from the learner right after, before anything else runs; no second engine is kept in memory.

Held-out judge items come from the eval split, built once per run from the initial model with
the recipe-level `judge` section (`<run>/judge/eval_pairs.jsonl`), so runs that start from the
same model (JudgeRLVR or plain RLVR with `judge.evaluate: true`) are compared on the same items.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import ray

from rlkit.config.schema import RecipeConfig
from rlkit.data import judge as judge_lib
from rlkit.data.stream import PromptStream
from rlkit.models.loading import DTYPES, read_state_dict, resolve_model_dir
from rlkit.models.tokenizer import apply_chat
from rlkit.rollout.sampling import SamplingParams
from rlkit.trainer.context import RunContext, StageSpec
from rlkit.trainer.rlvr import TaskSource, run_rlvr, sampling_params
from rlkit.workers import weight_wire


def evaluates(cfg: RecipeConfig) -> bool:
    """Whether the run measures held-out judge accuracy."""
    if cfg.judge.evaluate is not None:
        return cfg.judge.evaluate
    return any(st.type == "judge" for st in cfg.stages)


def build_step(step: int, refresh_every: int) -> int:
    """The step after which the judge set used by `step` (1-based) was built."""
    return 0 if refresh_every <= 0 else (step - 1) // refresh_every * refresh_every


# --- candidates and judge sets -------------------------------------------------------------


def _candidate_params(cfg: RecipeConfig, seed: int) -> SamplingParams:
    j, r = cfg.judge, cfg.rollout
    return SamplingParams(
        temperature=r.temperature if j.temperature is None else j.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=j.candidate_max_new_tokens or r.max_new_tokens,
        stop=list(r.stop),
        seed=seed,
    )


def _push_checkpoint(ctx: RunContext, path: str) -> None:
    """Put a checkpoint's weights into the rollout workers (the caller syncs the policy back)."""
    model_dir = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        model_dir = resolve_model_dir(path)
    dtype = DTYPES[ctx.rollout_dtype]
    state = {k: v.to(dtype) for k, v in read_state_dict(model_dir).items()}
    ctx.rollout.load_weights(ray.put(weight_wire.pack(state)))


def sample_candidates(
    ctx: RunContext,
    cfg: RecipeConfig,
    samples: list[dict[str, Any]],
    prompt_ids: list[list[int]],
    problem_idx: list[int],
    seed: int,
) -> list[dict[str, Any]]:
    """Candidates for the given problems from the policy and each extra checkpoint, labelled
    by the task's verifier: dicts with problem_index, problem, solution, label, source."""
    j = cfg.judge
    prompts = [prompt_ids[i] for i in problem_idx]
    sources: list[str | None] = [None, *j.extra_checkpoints]
    out: list[dict[str, Any]] = []
    try:
        for k, path in enumerate(sources):
            if path is not None:
                _push_checkpoint(ctx, path)
            outs = ctx.generate(
                prompts, _candidate_params(cfg, seed + 1_009 * k), j.candidates_per_problem
            )
            chosen = [problem_idx[c["prompt_index"]] for c in outs]
            scored = ctx.score([c["text"] for c in outs], [samples[i] for i in chosen])
            for c, i, score in zip(outs, chosen, scored["scores"], strict=True):
                out.append(
                    {
                        "problem_index": i,
                        "problem": judge_lib.problem_text(samples[i]["prompt"]),
                        "solution": c["text"],
                        "label": bool(score >= 1.0),
                        "source": "policy" if path is None else path,
                        "truncated": c["finish_reason"] == "length",
                    }
                )
    finally:
        if len(sources) > 1:
            ctx.sync_weights()  # the policy's own weights back into the rollout workers
    return out


def _write_set(path: str, pairs: list[dict[str, Any]], stats: dict[str, float]) -> None:
    """Stats first, then the pairs file renamed into place: the .jsonl exists only when whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stats_path = path[: -len(".jsonl")] + ".stats.json"
    with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    os.replace(stats_path + ".tmp", stats_path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _read_set(path: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    with open(path, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    stats_path = path[: -len(".jsonl")] + ".stats.json"
    stats: dict[str, float] = {}
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    return pairs, stats


def judge_prompt_ids(ctx: RunContext, cfg: RecipeConfig, pairs: list[dict]) -> list[list[int]]:
    return [
        apply_chat(
            ctx.tokenizer,
            judge_lib.render_prompt(cfg.judge.template, p["problem"], p["solution"]),
        )
        for p in pairs
    ]


def build_set(
    ctx: RunContext,
    cfg: RecipeConfig,
    split: str,
    problem_idx: list[int],
    seed: int,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    samples = ctx.train_samples if split == "train" else ctx.eval_samples
    ids = ctx.train_prompt_ids if split == "train" else ctx.eval_prompt_ids
    candidates = sample_candidates(ctx, cfg, samples, ids, problem_idx, seed)
    rng = random.Random(seed)
    min_pairs = cfg.judge.min_pairs if limit is None else limit
    pairs = judge_lib.select_pairs(candidates, cfg.judge.pairs_per_problem, min_pairs, rng)
    if limit is not None:
        # Held-out: exactly balanced, so a constant verdict scores 0.5.
        pairs = judge_lib.balance_subset(pairs, limit, rng)
    return pairs, judge_lib.pair_stats(pairs, candidates)


# --- the judge stage ----------------------------------------------------------------------


class JudgeSource(TaskSource):
    """The judge stage's items: the current judge set, scored by verdict against label."""

    def __init__(self, ctx: RunContext, stage: StageSpec) -> None:
        super().__init__(ctx)
        self.stage = stage
        self.pairs: list[dict[str, Any]] = []
        self.prompt_ids = []
        self.stats: dict[str, float] = {}
        self.built_for: int | None = None
        self._verdicts: list[bool | None] = []
        self._rewards: list[float] = []
        self._labels: list[bool] = []

    def cache_path(self, b: int) -> str:
        name = f"pairs_{self.stage.index}_{self.stage.name}_{b}.jsonl"
        return os.path.join(self.ctx.run_dir, "judge", name)

    def problems_for(self, b: int) -> list[int]:
        """The train problems of the set built after step b: consecutive slices of one seeded
        order over the train split, a pure function of b."""
        cfg = self.ctx.cfg
        k = b // cfg.judge.refresh_every if cfg.judge.refresh_every > 0 else 0
        order = PromptStream(len(self.ctx.train_samples), cfg.data.seed + 7 * self.stage.index)
        order.take(k * cfg.judge.num_problems)
        return order.take(cfg.judge.num_problems)

    def start_step(self, step: int) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        b = build_step(step, cfg.judge.refresh_every)
        if b != self.built_for:
            with ctx.timer.phase("judge_data"):
                self._load_or_build(b, fresh=b == step - 1)
        self._verdicts, self._rewards, self._labels = [], [], []

    def _load_or_build(self, b: int, fresh: bool) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        path = self.cache_path(b)
        if os.path.exists(path):
            pairs, stats = _read_set(path)
        else:
            if not fresh:
                print(
                    f"rlkit: judge set {path} is missing; rebuilding it from the current weights",
                    flush=True,
                )
            seed = cfg.train.seed * 1_000_003 + self.stage.index * 100_003 + 50_021 * (b + 1)
            pairs, stats = build_set(ctx, cfg, "train", self.problems_for(b), seed)
            _write_set(path, pairs, stats)
        self.pairs, self.stats = pairs, stats
        self.prompt_ids = judge_prompt_ids(ctx, cfg, pairs)
        # A set that starts here is walked from its beginning; a resumed run keeps the cursor
        # over the set it was using, restored from the checkpoint.
        if fresh or ctx.stream.size != len(pairs):
            ctx.stream = PromptStream(len(pairs), cfg.data.seed)
        self.built_for = b

    def sampling(self, cfg: RecipeConfig, seed: int) -> SamplingParams:
        # The rollout temperature (the learner's log-probs assume it); verdicts are short.
        params = sampling_params(cfg, seed)
        params.max_new_tokens = cfg.judge.max_new_tokens
        return params

    def score(self, texts: list[str], items: list[int]) -> dict[str, Any]:
        rewards, verdicts = [], []
        labels = [bool(self.pairs[i]["label"]) for i in items]
        for text, label in zip(texts, labels, strict=True):
            reward, verdict = judge_lib.judge_reward(text, label)
            rewards.append(reward)
            verdicts.append(verdict)
        self._rewards += rewards
        self._verdicts += verdicts
        self._labels += labels
        return {"scores": rewards, "extras": [{} for _ in texts], "metrics": {}}

    def step_metrics(self) -> dict[str, float]:
        out = {
            f"judge/{k}": v
            for k, v in judge_lib.verdict_metrics(self._verdicts, self._rewards).items()
        }
        for side, name in ((True, "pos"), (False, "neg")):
            r = [rw for rw, lb in zip(self._rewards, self._labels, strict=True) if lb == side]
            if r:
                out[f"judge/accuracy_{name}"] = sum(r) / len(r)
        for k in ("num_pairs", "pos_frac", "problems_mixed_frac", "candidate_accuracy"):
            if k in self.stats:
                out[f"judge/{k}"] = float(self.stats[k])
        return out


def run_judge(ctx: RunContext, stage: StageSpec, start_step: int) -> None:
    run_rlvr(ctx, stage, start_step, JudgeSource(ctx, stage))


# --- held-out judge accuracy ---------------------------------------------------------------


class HeldOutJudge:
    """Greedy verdicts on the held-out judge items: `eval/judge_*` at every evaluation."""

    def __init__(self, ctx: RunContext, cfg: RecipeConfig) -> None:
        self.ctx, self.cfg = ctx, cfg
        path = os.path.join(ctx.run_dir, "judge", "eval_pairs.jsonl")
        if os.path.exists(path):
            self.pairs, self.stats = _read_set(path)
        else:
            # Called right after launch: the rollout worker holds the initial model, also when
            # a run resumes, so the held-out set never depends on training.
            n = min(cfg.judge.num_eval_problems, len(ctx.eval_samples))
            seed = cfg.train.seed * 1_000_003 + 77_003
            limit = cfg.judge.num_eval_pairs
            self.pairs, self.stats = build_set(ctx, cfg, "eval", list(range(n)), seed, limit)
            _write_set(path, self.pairs, self.stats)
        self.prompt_ids = judge_prompt_ids(ctx, cfg, self.pairs)
        ctx.summary["judge_eval_set"] = dict(self.stats)

    def __call__(self) -> dict[str, float]:
        if not self.pairs:
            return {}
        params = SamplingParams(
            temperature=0.0,
            max_new_tokens=self.cfg.judge.max_new_tokens,
            stop=list(self.cfg.rollout.stop),
        )
        outs = self.ctx.generate(self.prompt_ids, params, 1)
        rewards, verdicts = [], []
        for c in outs:
            reward, verdict = judge_lib.judge_reward(
                c["text"], bool(self.pairs[c["prompt_index"]]["label"])
            )
            rewards.append(reward)
            verdicts.append(verdict)
        m = judge_lib.verdict_metrics(verdicts, rewards)
        return {
            "eval/judge_accuracy": m["accuracy"],
            "eval/judge_parse_fail_frac": m["parse_fail_frac"],
            "eval/judge_says_correct_frac": m["says_correct_frac"],
        }
