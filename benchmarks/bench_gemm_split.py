"""Split-K through cuBLAS's batched GEMM for the decode step's narrow projections (issue 16):
at ~452 rows, o (2048 -> 2048) and down (5632 -> 2048) have too few output tiles to fill an
H200's 132 multiprocessors, and cuBLAS's pick runs them at 400-460 TFLOP/s against ~700 for
gate/up. Does splitting K into S slices (one `torch.bmm` of S batches, then a sum) fill it?

    python benchmarks/bench_gemm_split.py [--rows 64,452,454] [--splits 2,3,4] [--json FILE]
        [--shapes qkv,o,gate_up,down | name:K:N,...]

Variants a projection x [M, K] @ W[N, K]^T, bf16 (the random 1.5B Qwen2 shape):
  linear         F.linear (the engine's path)
  pad            F.linear over the rows rounded up to a multiple of 64 (a padded buffer)
  bmm{S}         `decode_gemm.linear_partials` (the engine's: torch.bmm of S K-slice views)
                 -> [S, M, N] bf16 partials alone (what a consumer that
                 sums the partials itself, e.g. the residual add + RMSNorm after o and down,
                 would pay for the GEMM)
  bmm{S}+sum     the same, then .sum(0) (a standalone split-K)
  bmm{S}f32      float32 partials (`out_dtype`, where this torch's bmm takes it)
Each from a CUDA graph of calls over enough weight copies that they come from memory, median
of --repeats (`rlkit.bench.time_cuda_graph`); the largest difference of each output from
linear's is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from rlkit.kernels import decode_gemm as dg

from rlkit.bench import time_cuda_graph

SHAPES = {
    "qkv": (2048, 4096),
    "o": (2048, 2048),
    "gate_up": (2048, 11264),
    "down": (5632, 2048),
}
ROTATE_BYTES = 256 << 20


def _variants(x: torch.Tensor, xp: torch.Tensor, ws: list[torch.Tensor], splits: list[int]):
    """label -> fn(i) over weight copy i % len(ws) (see the module's docstring)."""
    c, k = len(ws), x.shape[1]
    out = {
        "linear": lambda i: F.linear(x, ws[i % c]),
        "pad": lambda i: F.linear(xp, ws[i % c]),
    }
    for s in (s for s in splits if k % s == 0):
        out[f"bmm{s}"] = lambda i, s=s: dg.linear_partials(x, ws[i % c], s)
        out[f"bmm{s}+sum"] = lambda i, s=s: dg.linear_partials(x, ws[i % c], s).sum(0)
        out[f"bmm{s}f32"] = lambda i, s=s: dg.linear_partials(
            x, ws[i % c], s, out_dtype=torch.float32
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="64,452,454")
    ap.add_argument("--splits", default="2,3,4")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="projections by name (the 1.5B shape's) or as name:K:N (e.g. SmolLM2's down, "
        "down135m:1536:576)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_split.py needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    splits = [int(s) for s in args.splits.split(",")]
    out: list[dict] = []
    shapes = {}
    for spec in args.shapes.split(","):
        name, *kn = spec.split(":")
        shapes[name] = (int(kn[0]), int(kn[1])) if kn else SHAPES[name]
    for name, (k, n) in shapes.items():
        copies = max(2, ROTATE_BYTES // (k * n * 2))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)]
        for m in (int(r) for r in args.rows.split(",")):
            pad = -(-m // 64) * 64
            xp = torch.randn(pad, k, device=dev, dtype=dt)
            x = xp[:m]
            ref = F.linear(x, ws[0]).float()
            variants = _variants(x, xp, ws, splits)
            for label, fn in variants.items():
                try:
                    y = fn(0)
                    if y.dim() == 3:
                        y = y.float().sum(0)
                    diff = float((y[:m].float() - ref).abs().max())
                    t = time_cuda_graph(fn, 2 * copies, args.repeats)
                except (RuntimeError, TypeError) as e:
                    print(f"{name:8s} rows {m:4d} {label:10s}: unavailable ({e})", flush=True)
                    continue
                row = {
                    "proj": name, "rows": m, "variant": label, "us": 1e6 * t,
                    "tflop_s": 2 * m * k * n / t / 1e12, "max_abs_diff": diff,
                }  # fmt: skip
                out.append(row)
                print(
                    f"{name:8s} rows {m:4d} {label:10s}: {row['us']:7.2f} us "
                    f"{row['tflop_s']:6.0f} TFLOP/s  diff {diff:.3g}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
