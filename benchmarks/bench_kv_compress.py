"""The KV compression kernels (rlkit.kernels.kv_compress) one op at a time, and one whole
`CompressedKVCache.compress`, at the Sparse-RL GPU shape.

    python benchmarks/bench_kv_compress.py --device cuda [--lengths 576,1088] [--iters 50]
        [--json benchmarks/results/gpu_bench_kv_compress.json]
    TRITON_INTERPRET=1 python benchmarks/bench_kv_compress.py --device cpu   # tiny, a smoke run

CUDA: a random 1.5B Qwen2-shaped cache (24 layers, 16 query / 8 kv heads, head_dim 128,
bf16), 64 rows of L entries (budget 512 + interval 64 = 576; 1088), SnapKV window 8. Rows:

    scores/reference       the PyTorch reference (float32 logits [R, KVH, G*w, L] in memory)
    scores/kernel-bN       the library's kernel (stats / norm / probs, parallel over entry
                           blocks of N)
    keep_top/*, compact/*  selection (budget 512) and in-place compaction of one [R, KVH, L, D]
                           store; the engine compacts K and V per layer. keep_top's kernels:
                           rank (L * L comparisons a row) and select (a bisection over the
                           scores' bits, the default since 2026-11-30)
    compress/snapkv        one CompressedKVCache.compress of all 64 rows, 24 layers (device
                           time from CUDA events, host time until the launches return)

Each row: the median of --iters timed calls (CUDA events) after --warmup; GB/s counts the
bytes the op must read at least once (the K slice for scores, the kept rows read and written
for compaction); for the scores rows, the largest error against the reference and the largest
distance from the cut-off of an entry whose selection differs (0: same entries kept).
On the CPU the shapes are tiny and the kernels run only under TRITON_INTERPRET=1.
The kernel before issue 16 (one program per (row, kv head), float32 IEEE dot: 4.30 ms at
L = 576 on an H200; 0.10 ms with only its dot in bf16) was timed by this script's first
version (commit 5c75a69; benchmarks/results/gpu_bench_kv_compress.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from rlkit.kernels import kv_compress as kc
from rlkit.kernels.triton_support import HAS_TRITON

from rlkit.config.schema import KVCompressionConfig
from rlkit.rollout.kv_cache import CompressedKVCache


def time_op(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of `iters` calls after `warmup` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_length(args, shape: dict, L: int, kernels: bool) -> list[dict]:
    dev, R, H, KVH, w, D = args.device, shape["R"], shape["H"], shape["KVH"], shape["w"], shape["D"]
    budget, dtype = min(shape["budget"], L - 1), shape["dtype"]
    g = torch.Generator(device=dev).manual_seed(L)
    # Keys: a strided view of a store with spare room per row, as the cache passes them.
    store = torch.randn(R, KVH, L + 16, D, generator=g, device=dev, dtype=dtype)
    keys = store[:, :, :L]
    # Queries [R, H, w, D] as the ring gathers them: a transposed view.
    q = torch.randn(R, w, H, D, generator=g, device=dev, dtype=dtype).transpose(1, 2)
    lengths = torch.full((R,), L, dtype=torch.int64, device=dev)
    lengths[R // 2 :] = torch.randint(budget + 1, L + 1, (R - R // 2,), generator=g, device=dev)
    k_bytes = R * KVH * L * D * keys.element_size()
    run = lambda fn: time_op(fn, dev, args.warmup, args.iters)  # noqa: E731
    want = kc.window_scores_reference(q, keys, lengths)
    rows = []

    def score_row(name: str, fn: Callable[[], torch.Tensor]) -> None:
        got = fn()
        ms = run(fn)
        rows.append({
            "op": f"scores/{name}", "L": L, "ms": ms, "GB/s": k_bytes / ms / 1e6,
            "max_err": float((got - want).abs().max()),
            "sel_gap": kc.selection_gap(got, want, lengths, budget, w),
        })  # fmt: skip

    score_row("reference", lambda: kc.window_scores_reference(q, keys, lengths))
    if kernels:
        for bn in args.block_n:
            score_row(
                f"kernel-b{bn}", lambda bn=bn: kc.window_scores_triton(q, keys, lengths, block_n=bn)
            )
    scores = want
    idx = kc.keep_top_reference(scores, lengths, budget, w)
    rank = functools.partial(kc.keep_top_triton, select=False)
    select = functools.partial(kc.keep_top_triton, select=True)
    for name, fn in [("reference", kc.keep_top_reference)] + (
        [("kernel-rank", rank), ("kernel-select", select)] if kernels else []
    ):
        same = torch.equal(fn(scores, lengths, budget, w), idx)
        ms = run(lambda fn=fn: fn(scores, lengths, budget, w))
        rows.append({"op": f"keep_top/{name}", "L": L, "ms": ms, "equal": same})
    slots = torch.arange(R, device=dev)
    moved = 2 * R * KVH * budget * D * store.element_size()
    compactors: list[tuple[str, Callable[[], None]]] = [
        ("reference", lambda: kc.compact_rows_reference(store, slots, idx))
    ]
    if kernels:
        compactors += [
            (f"kernel-p{p}", lambda p=p: kc.compact_rows_triton(store, slots, idx, block_p=p))
            for p in args.block_p
        ]
    for name, fn in compactors:
        ms = run(fn)
        rows.append({"op": f"compact/{name}", "L": L, "ms": ms, "GB/s": moved / ms / 1e6})
    return rows


def bench_compress(args, shape: dict) -> dict:
    """One CompressedKVCache.compress of every row at budget + interval entries."""
    cfg = KVCompressionConfig(
        policy="snapkv", budget=shape["budget"], window=shape["w"], interval=shape["interval"]
    )
    R, n = shape["R"], shape["budget"] + shape["interval"]
    cache = CompressedKVCache(
        shape["layers"], R, n, n, shape["H"], shape["KVH"], shape["D"], cfg,
        shape["dtype"], args.device, cpu_kernels=False,
    )  # fmt: skip
    g = torch.Generator(device=args.device).manual_seed(0)
    for t in (cache.k, cache.v, cache.queries):
        t.copy_(torch.randn(t.shape, generator=g, device=args.device, dtype=t.dtype))
    rows = np.arange(R)
    host, device = [], []
    for _ in range(args.warmup + args.iters):
        cache.group_lengths[0, :] = n
        cache.positions[:] = n
        if args.device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        cache.compress(rows)
        t1 = time.perf_counter()
        if args.device == "cuda":
            end.record()
            end.synchronize()
            device.append(start.elapsed_time(end))
        else:
            device.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    ms = statistics.median(device[args.warmup :])
    return {
        "op": "compress/snapkv", "L": n, "ms": ms,
        "host_ms": statistics.median(host[args.warmup :]),
        "per_step_ms": ms / shape["interval"],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--block-n", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--block-p", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kernels = HAS_TRITON and (cuda or interpreted)
    if cuda:
        shape = dict(R=64, H=16, KVH=8, w=8, D=128, budget=512, interval=64, layers=24,
                     dtype=torch.bfloat16)  # fmt: skip
        args.lengths = args.lengths or [576, 1088]
    else:
        shape = dict(R=2, H=4, KVH=2, w=8, D=16, budget=24, interval=16, layers=2,
                     dtype=torch.bfloat16)  # fmt: skip
        args.lengths = args.lengths or [40, 70]
        args.block_n = [16]
        args.block_p = [8]
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (50 if cuda else 2)
    torch.manual_seed(0)
    rows = [r for L in args.lengths for r in bench_length(args, shape, L, kernels)]
    rows.append(bench_compress(args, shape))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"bench_kv_compress on {name}: R={shape['R']} H={shape['H']} KVH={shape['KVH']} "
          f"w={shape['w']} D={shape['D']} budget={shape['budget']} {shape['dtype']}, "
          f"kernels={'triton' if kernels else 'off'}{' (interpreted)' if interpreted else ''}")  # fmt: skip
    cols = ["op", "L", "ms", "GB/s", "max_err", "sel_gap", "equal", "host_ms", "per_step_ms"]
    print("  ".join(f"{c:>20}" if c == "op" else f"{c:>11}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                digits = ".3g" if c in ("max_err", "sel_gap") else ".4f" if v < 10 else ".1f"
                v = format(v, digits)
            cells.append(f"{v!s:>20}" if c == "op" else f"{v!s:>11}")
        print("  ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "shape": {k: str(v) for k, v in shape.items()},
                       "rows": rows}, f, indent=1)  # fmt: skip
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
