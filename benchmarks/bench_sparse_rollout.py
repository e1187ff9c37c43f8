"""Dense vs compressed-KV (Sparse-RL) rollouts of the native engine.

    python benchmarks/bench_sparse_rollout.py [--batch 32] [--prompt 64] [--new 1024]
        [--policy snapkv] [--budget 256] [--window 8] [--interval 64] [--profile FILE]
        [--only dense|sparse] [--json FILE]

SmolLM2-135M-Instruct in bf16, `batch` random prompts of `prompt` tokens, `new` tokens each,
temperature 1, ignore_eos. Reports generated tokens/s (prefill included), the KV cache bytes
allocated (`Engine.stats`), the retained fraction and the compression events. --profile
writes a torch.profiler table of sparse decode steps (a shorter run). --random-weights builds
the same architecture with random weights and a stub tokenizer (speed and bytes do not depend
on the weights with ignore_eos), for a machine without the checkpoint; --device picks where.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlkit.config.schema import KVCompressionConfig
from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.loading import load_model
from rlkit.rollout import Engine, SamplingParams

SMOLLM2_135M = ModelArgs(
    arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, eos_token_ids=[2], max_position_embeddings=8192,
)  # fmt: skip


class _StubTokenizer:
    eos_token_id = 2

    def get_vocab(self) -> dict[str, int]:
        return {}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def make_engine(args: argparse.Namespace, compression: KVCompressionConfig | None) -> Engine:
    if args.random_weights:
        torch.manual_seed(0)
        model = Decoder(SMOLLM2_135M).to(args.device)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        tok = _StubTokenizer()
    else:
        model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
        model = model.to(args.device)
    return Engine(model, tok, max_batch_size=args.batch, kv_compression=compression)


def run(args: argparse.Namespace, compression: KVCompressionConfig | None) -> dict[str, float]:
    engine = make_engine(args, compression)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt), generator=g).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, ignore_eos=True, seed=1)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in out)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, **engine.stats}


def profile(args: argparse.Namespace, compression: KVCompressionConfig, path: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    engine = make_engine(args, compression)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt)).tolist()
    new = compression.budget + 2 * compression.interval
    params = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with prof(activities=acts) as p:
        engine.generate(prompts, params)
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    with open(path, "w") as f:
        f.write(table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--only", choices=["dense", "sparse"])
    ap.add_argument("--profile")
    ap.add_argument("--json")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    comp = KVCompressionConfig(
        policy=args.policy, budget=args.budget, window=args.window, interval=args.interval
    )
    if args.profile:
        profile(args, comp, args.profile)
        return
    results = {}
    for name, c in (("dense", None), ("sparse", comp)):
        if args.only and args.only != name:
            continue
        results[name] = run(args, c)
        print(name, json.dumps(results[name]), flush=True)
    if len(results) == 2:
        d, s = results["dense"], results["sparse"]
        print(
            f"speed-up {s['tok_s'] / d['tok_s']:.2f}x, "
            f"peak KV {s['kv_bytes_peak'] / d['kv_bytes_peak']:.1%} of dense"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
