"""A decode step's RoPE + cache append + attention on CUDA: the one-launch kernel
(`rope_decode_attention_triton`) against the two launches it replaces (`rope_append_triton`,
then `sparse_decode_attention_triton`), at the memory-wall bench's shapes (issue 16).

    python benchmarks/bench_rope_attention.py [--rows 64:512,64:2048,64:4096,455:576]
        [--heads 16 --kv-heads 8 --head-dim 128] [--repeats 20] [--json FILE] [--sweep]
        [--read-probe]

Each `B:L` row: B sequences of a cache row of L entries, lengths uniform in [L/2, L] (the
dense cache midway through a 4,096-token rollout holds ~2k entries a row; the sparse one 512 +
up to its interval); `B:L:N`, every row N entries long (the engine's steady compressed step:
all rows between budget and budget + interval together), bf16, the new token's k/v/q as the decoder passes them. Every variant runs
from a CUDA graph of calls rotating over enough caches (>= 512 MB) that K/V come from memory,
replayed between CUDA events (median of --repeats, per call); the ratio two-launch / fused is
measured side by side in one process. Also prints the bandwidth of each (bytes of K/V read
over time) and the largest difference between the two outputs. `--read-probe`: first the
device's read bandwidth, a sum over 2 GiB of bf16 (the ceiling the kernels' GB/s compare to).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rlkit.kernels import rope_append as ra
from rlkit.kernels import sparse_decode_attention as sda

from rlkit.bench import time_cuda_graph

ROTATE_BYTES = 512 << 20


def make_set(B, H, KVH, D, L, gen, length=None):
    dev, dt = "cuda", torch.bfloat16
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dt).to(dev)  # noqa: E731
    if length:
        lengths = torch.full((B,), length, dtype=torch.int64).to(dev)
    else:
        lengths = torch.randint(L // 2, L + 1, (B,), generator=gen).to(dev)
    angles = torch.rand(B, 1, 1, D // 2, generator=gen) * 6.28
    cos = torch.cat([angles.cos()] * 2, -1).to(dt).to(dev)
    sin = torch.cat([angles.sin()] * 2, -1).to(dt).to(dev)
    return {
        "q": rnd(B, 1, H, D), "k": rnd(B, 1, KVH, D), "v": rnd(B, 1, KVH, D),
        "cos": cos, "sin": sin, "k_cache": rnd(B, KVH, L, D), "v_cache": rnd(B, KVH, L, D),
        "lengths": lengths,
    }  # fmt: skip


def two_launch(s, **knobs):
    write = (s["lengths"] - 1)[:, None]
    q_rot = ra.rope_append_triton(
        s["q"], s["k"], s["v"], s["cos"], s["sin"], write, s["k_cache"], s["v_cache"]
    )
    return sda.sparse_decode_attention_triton(
        q_rot[:, :, 0], s["k_cache"], s["v_cache"], s["lengths"], **knobs
    )


def fused(s, **knobs):
    return sda.rope_decode_attention_triton(
        s["q"], s["k"], s["v"], s["cos"], s["sin"], s["k_cache"], s["v_cache"], s["lengths"],
        **knobs,
    )  # fmt: skip


SWEEP = [
    {"num_splits": sp, "num_warps": w, "num_stages": st, "block_n": bn}
    for sp in (1, 2, 4) for w in (4, 8) for st in (2, 3, 4) for bn in (32, 64, 128)
]  # fmt: skip


def sweep_row(sets: list, n: int, repeats: int) -> dict:
    """The best kernel configuration of each variant (--sweep), per call microseconds."""
    best: dict = {}
    for name, fn in (("two_launch", two_launch), ("fused", fused)):
        for knobs in SWEEP:
            try:
                t = time_cuda_graph(
                    lambda i, fn=fn, kn=knobs: fn(sets[i % n], **kn), 2 * n, repeats
                )
            except Exception as e:  # e.g. out of shared memory: skipped, named
                print(f"  {name} {knobs}: {type(e).__name__}", flush=True)
                continue
            if name not in best or t < best[name][0]:
                best[name] = (t, knobs)
    return {f"{k}_best_us": 1e6 * v[0] for k, v in best.items()} | {
        f"{k}_best_knobs": v[1] for k, v in best.items()
    }


def read_probe(repeats: int) -> float:
    """GB/s of a sum over 2 GiB of bf16 (four 512 MiB buffers in turn), from a CUDA graph."""
    xs = [torch.ones(256 << 20, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    t = time_cuda_graph(lambda i: xs[i % 4].sum(dtype=torch.float32), 8, repeats)
    gb_s = xs[0].numel() * 2 / t / 1e9
    print(f"read probe: {gb_s:.0f} GB/s (sum over 512 MiB of bf16)", flush=True)
    return gb_s


def bench_row(
    B: int, L: int, H: int, KVH: int, D: int, repeats: int, gen, sweep: bool = False,
    length: int | None = None,
) -> dict:  # fmt: skip
    set_bytes = 2 * B * KVH * L * D * 2
    n = max(2, min(32, -(-ROTATE_BYTES // set_bytes)))
    sets = [make_set(B, H, KVH, D, L, gen, length) for _ in range(n)]
    out_two, out_fused = two_launch(sets[0]), fused(sets[0])
    diff = (out_two.float() - out_fused.float()).abs().max().item()
    kv_read = sum(2 * int(s["lengths"].sum()) * KVH * D * 2 for s in sets) / n
    t_two = time_cuda_graph(lambda i: two_launch(sets[i % n]), 2 * n, repeats)
    t_fused = time_cuda_graph(lambda i: fused(sets[i % n]), 2 * n, repeats)
    row = {
        "B": B, "L": L, "length": length, "H": H, "KVH": KVH, "D": D,
        "splits": sda._pick_num_splits(B, KVH, L, 64, sets[0]["q"].device),
        "two_launch_us": 1e6 * t_two, "fused_us": 1e6 * t_fused,
        "two_over_fused": t_two / t_fused,
        "two_launch_gb_s": kv_read / t_two / 1e9, "fused_gb_s": kv_read / t_fused / 1e9,
        "max_diff": diff,
    }  # fmt: skip
    print(
        f"B={B:4d} L={L:5d} splits={row['splits']:2d}: two launches {row['two_launch_us']:8.1f} us "
        f"({row['two_launch_gb_s']:5.0f} GB/s), fused {row['fused_us']:8.1f} us "
        f"({row['fused_gb_s']:5.0f} GB/s), two / fused {row['two_over_fused']:.3f}x, "
        f"max diff {diff:.3g}",
        flush=True,
    )
    if sweep:
        row |= sweep_row(sets, n, repeats)
        print(
            f"  best: two launches {row['two_launch_best_us']:.1f} us "
            f"{row['two_launch_best_knobs']}, fused {row['fused_best_us']:.1f} us "
            f"{row['fused_best_knobs']}",
            flush=True,
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64:512,64:2048,64:4096,455:576")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="also the best splits/warps/stages/block")
    ap.add_argument("--read-probe", action="store_true", help="first the device's read GB/s")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_rope_attention.py needs a CUDA device")
    H, KVH, D = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    probe = read_probe(args.repeats) if args.read_probe else None
    for spec in args.rows.split(","):
        B, L, *n = (int(x) for x in spec.split(":"))
        rows.append(bench_row(B, L, H, KVH, D, args.repeats, gen, args.sweep, n[0] if n else None))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "read_gb_s": probe, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
