"""Held-out evaluation: greedy accuracy and pass@k, in a training run or from `rlkit eval`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from math import comb
from typing import Any


def accuracy_metrics(
    scores: Sequence[float], lengths: Sequence[int], prefix: str = "eval"
) -> dict[str, float]:
    n = max(1, len(scores))
    return {
        f"{prefix}/accuracy": sum(1.0 for s in scores if s >= 1.0) / n,
        f"{prefix}/reward_mean": sum(scores) / n,
        f"{prefix}/length_mean": sum(lengths) / max(1, len(lengths)),
    }


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def main(
    model: str,
    cfg,
    split: str = "eval",
    k: int | None = None,
    json_path: str | None = None,
    **_: Any,
) -> dict[str, float]:
    """`rlkit eval`: greedy accuracy (and pass@k when k > 1) of a checkpoint on a task split.

    Runs in-process (no Ray): one engine and one verifier pool are all evaluation needs.
    """

    from rlkit.device import pick_dtype
    from rlkit.models.loading import load_model
    from rlkit.rewards.runner import VerifierPool
    from rlkit.rewards.sandbox import Sandbox
    from rlkit.rollout.engine import Engine
    from rlkit.rollout.sampling import SamplingParams
    from rlkit.trainer.data_setup import load_split, verifier_spec
    from rlkit.workers.placement import local_device

    k = k or cfg.eval.k
    where = local_device(cfg.device)[0]
    choice = pick_dtype(cfg.rollout.dtype, where)
    net, tokenizer = load_model(model, dtype=choice.dtype)
    net = net.to(where).eval()
    engine = Engine(
        net,
        tokenizer,
        max_batch_size=cfg.rollout.max_batch_size,
        dtype=choice.dtype,
        kv_memory_gb=cfg.rollout.kv_memory_gb,
        kv_memory_fraction=cfg.rollout.kv_memory_fraction,
    )
    print(f"rlkit eval: {engine.describe()} ({choice.why})", flush=True)
    samples, prompt_ids, _dropped = load_split(cfg, tokenizer, split)
    pool = VerifierPool(
        verifier_spec(cfg),
        cfg.reward.style,
        cfg.reward.kwargs,
        cfg.reward.num_workers,
        cfg.reward.timeout_s,
        base_dir=os.getcwd(),
        sandbox=Sandbox(**asdict(cfg.reward.sandbox)),
    )
    try:
        greedy = engine.generate(
            prompt_ids,
            SamplingParams(
                temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens, stop=list(cfg.rollout.stop)
            ),
            n=1,
        )
        scored = pool.score([c.text for c in greedy], samples)
        out = accuracy_metrics(scored.scores, [len(c.token_ids) for c in greedy], prefix=split)
        if k > 1:
            params = SamplingParams(
                temperature=cfg.eval.temperature,
                max_new_tokens=cfg.eval.max_new_tokens,
                stop=list(cfg.rollout.stop),
                seed=cfg.train.seed,
            )
            sampled = engine.generate(prompt_ids, params, n=k)
            s = pool.score([c.text for c in sampled], [samples[c.prompt_index] for c in sampled])
            correct = [0] * len(samples)
            for c, score in zip(sampled, s.scores):
                correct[c.prompt_index] += score >= 1.0
            out[f"{split}/pass@{k}"] = sum(pass_at_k(k, c, k) for c in correct) / max(
                1, len(samples)
            )
            out[f"{split}/pass@1_sampled"] = sum(pass_at_k(k, c, 1) for c in correct) / max(
                1, len(samples)
            )
    finally:
        pool.close()
    out[f"{split}/num_problems"] = len(samples)
    print(json.dumps(out, indent=1))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out
