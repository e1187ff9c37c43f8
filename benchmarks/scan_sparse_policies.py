"""How far each KV-compression policy's sampler is from the dense policy, on the base model.

    python benchmarks/scan_sparse_policies.py [--recipe recipes/sparse_grpo_arithmetic.yaml]
        [--budget 28] [--window 16] [--interval 1] [--policies snapkv,rkv,...] [--n 64]

For the recipe's task and model, per policy (and dense): greedy held-out accuracy under the
compressed cache, and, for temperature-1 samples (n per prompt, `--n` prompts), the
Sparse-RL mismatch the learner would see: rho = exp(logp_dense - logp_sparse) per token, the
fraction of tokens outside [0.5, 1.5] and of samples with a token under 1e-4, and the
retained KV fraction (`Engine.stats`). A quick way to pick a policy and budget before
training: the closer rho stays to 1, the fewer tokens the corrections have to drop.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rlkit.rewards.runner import score

from rlkit.algorithms.logprobs import token_logprobs
from rlkit.algorithms.sparse_rl import sparse_corrections
from rlkit.config import load_recipe
from rlkit.config.schema import KVCompressionConfig
from rlkit.models.loading import load_model
from rlkit.rollout import Engine, SamplingParams
from rlkit.trainer.data_setup import load_split, verifier_spec


def mismatch(model, prompts, outs) -> dict[str, float]:
    """Sparse-RL's correction metrics (`sparse_corrections`, default bounds) for completions
    `outs` of `prompts`, against the dense log-probs of `model`."""
    T = max(len(o.token_ids) for o in outs)
    dense = torch.zeros(len(outs), T)
    sparse = torch.zeros(len(outs), T)
    mask = torch.zeros(len(outs), T)
    with torch.inference_mode():
        for i, o in enumerate(outs):
            p, n = prompts[o.prompt_index], len(o.token_ids)
            hidden = model(torch.tensor([p + o.token_ids]))[0, len(p) - 1 : -1]
            dense[i, :n] = token_logprobs(hidden, model.lm_head_weight, torch.tensor(o.token_ids))[
                0
            ]
            sparse[i, :n] = torch.tensor(o.logprobs)
            mask[i, :n] = 1.0
    log_ratio = ((dense - sparse) * mask).abs().sum() / mask.sum()
    return {**sparse_corrections(dense, sparse, mask)[2], "mean_abs_logratio": float(log_ratio)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/sparse_grpo_arithmetic.yaml")
    ap.add_argument("--policies", default="dense,snapkv,rkv,h2o,streaming,layer_hybrid")
    ap.add_argument("--budget", type=int, default=28)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--full-every", type=int, default=4)
    ap.add_argument("--hybrid-budget", type=int, default=None, help="budget for layer_hybrid")
    ap.add_argument("--n", type=int, default=32, help="prompts sampled for the mismatch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = load_recipe(args.recipe)
    ref, tok = load_model(cfg.model.path, dtype=torch.float32)
    ref.eval()
    samples, prompts, _ = load_split(cfg, tok, "eval")
    _, train_prompts, _ = load_split(cfg, tok, "train")
    train_prompts = train_prompts[: args.n]
    rows = []
    for name in args.policies.split(","):
        comp = None
        if name != "dense":
            budget = (
                args.hybrid_budget if name == "layer_hybrid" and args.hybrid_budget else args.budget
            )
            comp = KVCompressionConfig(
                policy=name,
                budget=budget,
                window=args.window,
                interval=args.interval,
                full_every=args.full_every,
            )
        m, _ = load_model(cfg.model.path, dtype=torch.bfloat16)
        eng = Engine(m, tok, max_batch_size=128, kv_compression=comp)
        t0 = time.perf_counter()
        greedy = eng.generate(
            prompts, SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
        )
        acc = score(verifier_spec(cfg), [o.text for o in greedy], samples).scores
        sampled = eng.generate(
            train_prompts, SamplingParams(temperature=1.0, max_new_tokens=48, seed=1), n=8
        )
        stats = dict(eng.stats)
        m = mismatch(ref, train_prompts, sampled)
        row = {
            "policy": name,
            "greedy_acc": sum(acc) / len(acc),
            "rho_out_frac": m["sparse_rejected_token_frac"],
            "veto_frac": m["sparse_vetoed_frac"],
            "mean_abs_logratio": m["mean_abs_logratio"],
            "kv_retained_frac_max": stats.get("kv_retained_frac_max", 1.0),
            "kv_retained_frac": stats.get("kv_retained_frac", 1.0),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
