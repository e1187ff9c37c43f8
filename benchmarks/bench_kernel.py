"""Time the sparse decode-attention kernel on CUDA against the PyTorch reference.

    python benchmarks/bench_kernel.py [--quick] [--peak-tbps 3.35] [--json FILE]

Decode shapes of our model family (SmolLM2-135M: H=9, KVH=3, D=64; a larger GQA model: H=32,
KVH=8, D=128), batch 32-256, KV budget L 256-8192, ragged lengths (uniform in [L/2, L]),
bf16 K/V as strided views of a bigger cache, as the engine passes them.

Each variant is captured in a CUDA graph of many calls (rotating over enough input sets that
K/V do not stay in L2) and timed by replaying it between CUDA events: a warm-up, then the
median of --repeats replays, divided by the calls per graph. Achieved bandwidth counts the
bytes the op must move: K and V of the valid entries (sum(lengths) * KVH * D * 2 * elem) plus
q, out and lengths; it is compared with the device's peak memory bandwidth (from its name, or
--peak-tbps) and with a measured device-to-device copy.

Variants: triton (splits chosen by the heuristic), triton-1 (one split, only where the
heuristic splits), sdpa (the reference's fast form: one masked F.scaled_dot_product_attention
over [B, KVH, G, D] in bf16; the rollout path without Triton).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from rlkit.kernels.sparse_decode_attention import (
    _pick_num_splits,
    sparse_decode_attention_reference,
    sparse_decode_attention_triton,
)

from rlkit.bench import time_cuda_graph

SHAPES = {"smollm2-135m": (9, 3, 64), "h32-kv8-d128": (32, 8, 128)}
PEAK_TBPS = [("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0)]
L2_ROTATE_BYTES = 512 << 20  # rotate inputs until this many bytes of K/V are in play


def peak_from_name(name: str) -> float | None:
    for key, tbps in PEAK_TBPS:
        if all(part in name for part in key.split()):
            return tbps
    return None


def time_eager(fn, calls: int, repeats: int) -> float:
    """Seconds per call: `calls` back-to-back launches between CUDA events, median of repeats.
    Includes launch overhead wherever a call is shorter than its host-side launch."""
    for i in range(min(calls, 3)):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def copy_tbps() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written."""
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 29) * 4 / t / 1e12


def make_sets(B, H, KVH, D, L, dtype, n_sets, gen):
    sets = []
    for _ in range(n_sets):
        # A cache with a few spare slots and spare length, so k/v are strided views.
        k_cache = torch.randn(B + 2, KVH, L + 64, D, device="cuda", dtype=dtype)
        v_cache = torch.randn(B + 2, KVH, L + 64, D, device="cuda", dtype=dtype)
        q = torch.randn(B, H, D, device="cuda", dtype=dtype)
        lengths = torch.randint(L // 2, L + 1, (B,), generator=gen).to("cuda")
        sets.append((q, k_cache[:B, :, :L], v_cache[:B, :, :L], lengths))
    return sets


def bench_config(shape, B, L, args, gen):
    H, KVH, D = SHAPES[shape]
    dtype = torch.bfloat16
    elem = torch.finfo(dtype).bits // 8
    kv_bytes_set = 2 * B * KVH * L * D * elem
    n_sets = max(1, min(64, -(-L2_ROTATE_BYTES // kv_bytes_set)))
    sets = make_sets(B, H, KVH, D, L, dtype, n_sets, gen)
    q, k, v, lengths = sets[0]
    ref = sparse_decode_attention_reference(q, k, v, lengths)
    err = (sparse_decode_attention_triton(q, k, v, lengths).float() - ref.float()).abs().max()
    moved = [
        int(s[3].sum()) * KVH * D * 2 * elem + 2 * B * H * D * elem + B * s[3].element_size()
        for s in sets
    ]
    nbytes = statistics.mean(moved)
    splits = _pick_num_splits(B, KVH, L, 64, q.device)
    est = nbytes / 2.5e12  # seconds per call at a plausible bandwidth
    # Up to ~2 ms of work per replay, every input set at least once, at most 64 calls.
    calls = min(64, max(n_sets, round(2e-3 / est)))

    def run(fn):
        timer = time_cuda_graph if args.timing == "graph" else time_eager
        return timer(lambda i: fn(*sets[i % n_sets]), calls, args.repeats)

    row = {
        "shape": shape,
        "B": B,
        "H": H,
        "KVH": KVH,
        "D": D,
        "L": L,
        "mean_len": round(float(torch.stack([s[3] for s in sets]).float().mean()), 1),
        "splits": splits,
        "bytes": nbytes,
        "max_err_vs_ref": float(err),
    }
    row["triton_us"] = run(sparse_decode_attention_triton) * 1e6
    if splits > 1:
        row["triton1_us"] = run(lambda *a: sparse_decode_attention_triton(*a, num_splits=1)) * 1e6
    row["sdpa_us"] = run(lambda *a: sparse_decode_attention_reference(*a, exact=False)) * 1e6
    row["triton_tbps"] = nbytes / row["triton_us"] / 1e6
    row["sdpa_tbps"] = nbytes / row["sdpa_us"] / 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--batches", nargs="*", type=int, default=[32, 64, 256])
    ap.add_argument("--lengths", nargs="*", type=int, default=[256, 1024, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=10)
    # eager: the figures in RESULTS.md. graph: launch overhead removed, but it hit an illegal
    # address inside graph replay on torch 2.11 / triton 3.6 (H100, 2026-11-23), cause unknown.
    ap.add_argument("--timing", choices=["eager", "graph"], default="eager")
    ap.add_argument("--peak-tbps", type=float, default=None, help="override peak bandwidth, TB/s")
    ap.add_argument("--json", default=None, help="write the rows and device info here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA device")
    if args.quick:
        args.batches, args.lengths = [32, 256], [1024, 8192]

    name = torch.cuda.get_device_name()
    peak = args.peak_tbps or peak_from_name(name)
    copy = copy_tbps()
    print(
        f"device: {name}; peak {peak} TB/s ({'flag' if args.peak_tbps else 'from name'}); "
        f"measured D2D copy {copy:.2f} TB/s; torch {torch.__version__}; timing {args.timing}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        for B in args.batches:
            for L in args.lengths:
                row = bench_config(shape, B, L, args, gen)
                torch.cuda.empty_cache()
                row["triton_pct_peak"] = 100 * row["triton_tbps"] / peak if peak else None
                rows.append(row)
                print(json.dumps(row), flush=True)

    head = (
        f"{'shape':<13} {'B':>4} {'L':>5} {'len':>6} {'spl':>3} {'triton us':>9} "
        f"{'TB/s':>5} {'%peak':>5} {'1-split us':>10} {'sdpa us':>8} {'sdpa TB/s':>9} "
        f"{'x sdpa':>6} {'err':>7}"
    )
    print("\n" + head)
    for r in rows:
        pct = f"{r['triton_pct_peak']:.0f}" if r["triton_pct_peak"] is not None else "-"
        one = f"{r['triton1_us']:.1f}" if "triton1_us" in r else "-"
        print(
            f"{r['shape']:<13} {r['B']:>4} {r['L']:>5} {r['mean_len']:>6.0f} {r['splits']:>3} "
            f"{r['triton_us']:>9.1f} {r['triton_tbps']:>5.2f} {pct:>5} {one:>10} "
            f"{r['sdpa_us']:>8.1f} {r['sdpa_tbps']:>9.2f} "
            f"{r['sdpa_us'] / r['triton_us']:>6.1f} {r['max_err_vs_ref']:>7.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "peak_tbps": peak,
                    "copy_tbps": copy,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
