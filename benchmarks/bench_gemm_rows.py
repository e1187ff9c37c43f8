"""The decode step's weight GEMMs against the number of rows, near the memory wall's 452
sequences (issue 16): does a row count pay for tiles or waves it does not fill?

    python benchmarks/bench_gemm_rows.py [--rows 384,416,440,448,452,456,480,512]
        [--repeats 20] [--json FILE]

The random 1.5B Qwen2 shape's projections (bf16, qkv with its bias): qkv 2048 -> 4096, o
2048 -> 2048, gate/up 2048 -> 11264, down 5632 -> 2048, LM head 2048 -> 32000. Each timed from
a CUDA graph of calls over enough weight copies that they come from memory (median of
--repeats), with cuBLAS and with cuBLASLt (`torch.backends.cuda.preferred_blas_library`).
Prints us per call and TFLOP/s per projection and row count.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from rlkit.bench import time_cuda_graph

SHAPES = {
    "qkv": (2048, 4096, True),
    "o": (2048, 2048, False),
    "gate_up": (2048, 11264, False),
    "down": (5632, 2048, False),
    "lm_head": (2048, 32000, False),
}
ROTATE_BYTES = 256 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="384,416,440,448,452,456,480,512")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_rows.py needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    out: list[dict] = []
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (k, n, bias) in SHAPES.items():
            copies = max(2, ROTATE_BYTES // (k * n * 2))
            ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)]
            bs = [torch.randn(n, device=dev, dtype=dt) if bias else None for _ in range(copies)]
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device=dev, dtype=dt)
                t = time_cuda_graph(
                    lambda i, x=x, ws=ws, bs=bs, c=copies: F.linear(x, ws[i % c], bs[i % c]),
                    2 * copies,
                    args.repeats,
                )
                row = {
                    "lib": lib, "proj": name, "rows": m, "us": 1e6 * t,
                    "tflop_s": 2 * m * k * n / t / 1e12,
                }  # fmt: skip
                out.append(row)
                print(
                    f"{lib:8s} {name:8s} rows {m:4d}: {row['us']:7.2f} us "
                    f"{row['tflop_s']:6.0f} TFLOP/s",
                    flush=True,
                )
    torch.backends.cuda.preferred_blas_library("cublas")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
