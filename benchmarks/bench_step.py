"""Time one rollout phase and one learner step of the default recipe, on the real model.

    .venv/bin/python benchmarks/bench_step.py [key=value ...]

Uses the same code the trainer's actors run (Engine, Learner, VerifierPool), in one process,
on real prompts of the recipe's task: a warm-up, then the median of --repeats timed runs.
Rollout tokens/s counts generated tokens; learner tokens/s counts the prompt + response tokens
the forward/backward pass processed (samples with zero advantage are skipped by the learner and
not counted). Both are printed side by side from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from rlkit.rewards.runner import VerifierPool

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.loading import resolve_model_dir
from rlkit.models.tokenizer import load_tokenizer
from rlkit.trainer.data_setup import load_split, verifier_spec
from rlkit.trainer.rlvr import sampling_params
from rlkit.workers.learner import Learner
from rlkit.workers.rollout_worker import RolloutWorker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/grpo_arithmetic.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe, args.overrides)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = load_tokenizer(model_dir)
    samples, prompt_ids, _ = load_split(cfg, tok, "train")
    worker = RolloutWorker(model_dir, cfg.rollout, args.threads)
    learner = Learner(model_dir, cfg, args.threads)
    pool = VerifierPool(
        verifier_spec(cfg), cfg.reward.style, cfg.reward.kwargs, 1, cfg.reward.timeout_s
    )
    p = cfg.train.prompts_per_step
    rollout_tps, learn_tps, rollout_s, learn_s = [], [], [], []
    try:
        for rep in range(args.repeats + 1):
            idx = list(range(rep * p, (rep + 1) * p))
            t0 = time.perf_counter()
            outs = worker.generate(
                [prompt_ids[i] for i in idx], sampling_params(cfg, seed=rep), cfg.rollout.n
            )
            t_roll = time.perf_counter() - t0
            gen_tokens = sum(len(o["token_ids"]) for o in outs)
            scores = pool.score(
                [o["text"] for o in outs], [samples[idx[o["prompt_index"]]] for o in outs]
            ).scores
            batch = RolloutBatch.from_sequences(
                [prompt_ids[idx[o["prompt_index"]]] for o in outs],
                [o["token_ids"] for o in outs],
                [o["logprobs"] for o in outs],
                scores,
                [o["prompt_index"] for o in outs],
            )
            batch.advantages = ADVANTAGES.get(cfg.algorithm.advantage)(
                batch.rewards, batch.group_ids, batch.response_mask
            )
            t0 = time.perf_counter()
            metrics = learner.train_step(batch)
            t_learn = time.perf_counter() - t0
            label = "warm-up" if rep == 0 else f"repeat {rep}"
            print(
                f"{label}: rollout {t_roll:.1f} s ({gen_tokens} tokens, {gen_tokens / t_roll:.0f} tok/s); "
                f"learner {t_learn:.1f} s ({metrics['throughput/learner_tokens_per_s']:.0f} tok/s, "
                f"skipped {metrics['actor/skipped_frac']:.0%} of samples); reward {sum(scores) / len(scores):.3f}",
                flush=True,
            )
            if rep > 0:
                rollout_tps.append(gen_tokens / t_roll)
                learn_tps.append(metrics["throughput/learner_tokens_per_s"])
                rollout_s.append(t_roll)
                learn_s.append(t_learn)
    finally:
        pool.close()
    print(
        f"\nmedian of {args.repeats}: rollout phase {statistics.median(rollout_s):.1f} s, "
        f"{statistics.median(rollout_tps):.0f} generated tok/s | learner step {statistics.median(learn_s):.1f} s, "
        f"{statistics.median(learn_tps):.0f} tok/s | {p} prompts x {cfg.rollout.n} samples, {args.threads} threads"
    )


if __name__ == "__main__":
    main()
