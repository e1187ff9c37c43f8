"""The decode step's linear layers at large batch on CUDA: cuBLAS (the engine's path; also with
cuBLASLt preferred) against `rlkit.kernels.batch_gemm`'s tiled kernel, at a model's four
projections and its LM head (issue 16: the 455 sequences of the memory wall).

    python benchmarks/bench_batch_gemm.py [--rows 455] [--json FILE]
        [--hidden 2048 --intermediate 5632 --heads 16 --kv-heads 8 --head-dim 128 --vocab 32000]

Defaults: the random 1.5B Qwen2 shape of the memory-wall bench, bf16. Ops:
  qkv        x @ W_qkv^T + b   (N = (H + 2 KVH) * head_dim, K = hidden)
  o          x @ W_o^T         (N = K = hidden)
  gate_up    cuBLAS: F.linear then `fused_norm.silu_mul` (two launches, the engine's GPU
             path); kernel: `batch_gate_up_silu` (one launch)
  down       x @ W_down^T      (N = hidden, K = intermediate)
  lm_head    x @ W_vocab^T     (N = vocab, K = hidden)
Each variant runs from a CUDA graph of calls rotating over enough weight copies (>= 512 MB)
that the weights come from memory, not L2, replayed between CUDA events (median of --repeats,
per call). The kernel is swept over its tile shapes; the best configuration is reported per op
beside cuBLAS, with TFLOP/s and the largest difference between the outputs. The ratios are
what `BATCH_GEMM_KNOBS` may take: only an op and row count where the kernel won.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from rlkit.kernels import batch_gemm as bg
from rlkit.kernels import fused_norm

from rlkit.bench import time_cuda_graph

ROTATE_BYTES = 512 << 20


def graph_ms(calls: list, repeats: int) -> float:
    """Device milliseconds per call of `calls` (closures), replayed from one CUDA graph."""
    return 1e3 * time_cuda_graph(lambda i: calls[i](), len(calls), repeats)


def configs() -> list[dict[str, int]]:
    out = []
    for bm, bn, bk, stages in itertools.product([64, 128], [64, 128, 256], [64, 128], [3, 4]):
        if bm * bn >= 128 * 256 and bk == 128:
            continue  # the largest tiles at BLOCK_K 128 overflow shared memory
        out.append(
            {"block_m": bm, "block_n": bn, "block_k": bk, "num_stages": stages,
             "num_warps": 4 if bm * bn <= 64 * 128 else 8}
        )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="455")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ops", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_batch_gemm.py needs CUDA")
    dev, dtype = "cuda", torch.bfloat16
    C, inter = a.hidden, a.intermediate
    shapes = {
        "qkv": ((a.heads + 2 * a.kv_heads) * a.head_dim, C, True),
        "o": (C, a.heads * a.head_dim, False),
        "gate_up": (2 * inter, C, False),
        "down": (C, inter, False),
        "lm_head": (a.vocab, C, False),
    }
    rows_out = []
    for M in (int(r) for r in a.rows.split(",")):
        for op in a.ops.split(","):
            N, K, has_bias = shapes[op]
            copies = max(2, -(-ROTATE_BYTES // (N * K * 2)))
            ws = [torch.randn(N, K, device=dev, dtype=dtype) / K**0.5 for _ in range(copies)]
            bias = torch.randn(N, device=dev, dtype=dtype) if has_bias else None
            x = torch.randn(M, K, device=dev, dtype=dtype)
            if op == "gate_up":

                def base(w, x=x):
                    return fused_norm.silu_mul(F.linear(x, w))

                def kern(w, x=x, **kw):
                    return bg.batch_gate_up_silu_triton(x, w, **kw)
            else:

                def base(w, x=x, bias=bias):
                    return F.linear(x, w, bias)

                def kern(w, x=x, bias=bias, **kw):
                    return bg.batch_linear_triton(x, w, bias, **kw)

            t_base = graph_ms([lambda w=w: base(w) for w in ws], a.repeats)
            default = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_lt = graph_ms([lambda w=w: base(w) for w in ws], a.repeats)
            torch.backends.cuda.preferred_blas_library(default)
            best = None
            for kw in configs():
                try:
                    t = graph_ms([lambda w=w, kw=kw: kern(w, **kw) for w in ws], a.repeats)
                except Exception as e:  # a configuration the compiler refuses (resources)
                    print(f"  {op} M={M} {kw}: {type(e).__name__}")
                    continue
                if best is None or t < best[0]:
                    best = (t, kw)
            if best is None:
                continue
            err = (kern(ws[0], **best[1]).float() - base(ws[0]).float()).abs().max().item()
            flops = 2 * M * N * K
            row = {
                "op": op, "rows": M, "N": N, "K": K, "cublas_ms": t_base, "cublaslt_ms": t_lt,
                "kernel_ms": best[0], "kernel_config": best[1],
                "cublas_over_kernel": t_base / best[0],
                "cublas_tflops": flops / t_base / 1e9, "kernel_tflops": flops / best[0] / 1e9,
                "max_abs_diff": err,
            }  # fmt: skip
            rows_out.append(row)
            print(
                f"{op:8s} M={M:4d} N={N:6d} K={K:5d}: cuBLAS {t_base * 1e3:7.2f} us "
                f"({row['cublas_tflops']:4.0f} TFLOP/s), cuBLASLt {t_lt * 1e3:7.2f} us, kernel "
                f"{best[0] * 1e3:7.2f} us ({row['kernel_tflops']:4.0f} TFLOP/s, {best[1]}), "
                f"cuBLAS / kernel {row['cublas_over_kernel']:.2f}x, max diff {err:.3g}",
                flush=True,
            )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
