"""One KV compression (`CompressedKVCache.compress`) on the CPU C kernels vs PyTorch.

    python benchmarks/bench_compress.py [--batch 32] [--budget 256] [--interval 64]
        [--policies snapkv,rkv,h2o,streaming,layer_hybrid] [--repeats 5]

SmolLM2-135M's cache shape (30 layers, 9 query / 3 kv heads, head_dim 64, --dtype): every row
holds budget + interval entries of random K/V (and queries, statistics), and one call
compresses all `batch` rows of every layer back to the budget, as the engine does every
`interval` decode steps. Prints the median time of each path side by side and their ratio;
the cost per decode step is that time / interval.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rlkit.kernels import cpu as cpu_kernels

from rlkit.config.schema import KVCompressionConfig
from rlkit.device import pick_dtype
from rlkit.rollout.kv_cache import CompressedKVCache

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def _cache(
    cfg: KVCompressionConfig, batch: int, kernels: bool, dtype: torch.dtype
) -> CompressedKVCache:
    full = cfg.budget + 8 * cfg.interval
    return CompressedKVCache(
        LAYERS, batch, cfg.budget + cfg.interval, full, HEADS, KV_HEADS, HEAD_DIM, cfg,
        dtype, cpu_kernels=kernels,
    )  # fmt: skip


def _fill(cache: CompressedKVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in (cache.k, cache.v, cache.kf, cache.vf, cache.queries):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.accumulated.copy_(torch.rand(cache.accumulated.shape, generator=g))
    n = cache.max_len
    cache.group_lengths[0] = n
    cache.group_lengths[1] = cache.full_len
    cache.positions[:] = cache.full_len
    if cache.oracle:
        cache.entry_pos[:] = torch.arange(cache.full_len - n, cache.full_len)


def _time(
    cfg: KVCompressionConfig, batch: int, kernels: bool, repeats: int, dtype: torch.dtype
) -> float:
    cache = _cache(cfg, batch, kernels, dtype)
    times = []
    for r in range(repeats + 1):  # the first call warms up
        _fill(cache, r)
        t0 = time.perf_counter()
        cache.compress(np.arange(batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--policies", default="snapkv,rkv,h2o,streaming,layer_hybrid")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="the cache's dtype; auto: the engine's choice on this CPU (rlkit.device.pick_dtype)",
    )
    args = ap.parse_args()
    choice = pick_dtype(args.dtype)
    dtype = choice.dtype
    if not cpu_kernels.available():
        raise SystemExit(f"the CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
    print(
        f"compress: {LAYERS} layers x {args.batch} rows, {args.budget + args.interval} -> "
        f"{args.budget} entries, {choice.name} ({choice.why}), {torch.get_num_threads()} threads"
    )
    print(f"{'policy':>13}  {'pytorch ms':>10}  {'kernels ms':>10}  {'speed-up':>8}  "
          f"{'kernels ms/step':>15}")  # fmt: skip
    for policy in args.policies.split(","):
        cfg = KVCompressionConfig(
            policy=policy, budget=args.budget, window=args.window, interval=args.interval
        )
        torch_ms = 1e3 * _time(cfg, args.batch, False, args.repeats, dtype)
        kernel_ms = 1e3 * _time(cfg, args.batch, True, args.repeats, dtype)
        print(
            f"{policy:>13}  {torch_ms:10.1f}  {kernel_ms:10.1f}  {torch_ms / kernel_ms:7.2f}x  "
            f"{kernel_ms / args.interval:15.2f}"
        )


if __name__ == "__main__":
    main()
