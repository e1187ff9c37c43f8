"""Can a decode step hide its GEMMs under its attention? Two micro-batches on two CUDA streams
against one batch on one stream, at the memory wall's 455-row shape (issue 16).

    python benchmarks/bench_overlap.py [--rows 455] [--length 576] [--layers 24] [--repeats 10]
        [--json FILE]

A stack of `--layers` decoder layers of the random 1.5B Qwen2 shape (hidden 2048, 16 heads, 8 KV
heads of 128, MLP 5632, bf16): per layer the qkv GEMM, the decode attention over a cache of
`--length` entries a row (lengths uniform in [length - 64, length]: a SnapKV cache between two
compressions), the o GEMM, a residual add + RMSNorm, gate/up, SiLU * up, down, add + RMSNorm.
At 455 rows the attention is bound by reading K/V and the GEMMs by arithmetic, so run
concurrently they could share the device. Timed from CUDA graphs (median of --repeats):

- `one_stream`: all rows, one stream (what the engine does);
- `two_streams`: rows split in halves, each half's whole stack on its own stream (forked and
  joined inside the graph), so one half's GEMMs may run beside the other's attention;
- `attention_only` / `gemms_only`: the stack with only those kernels (what each would cost alone).

Prints each in ms and the ratio one_stream / two_streams, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from rlkit.kernels import fused_norm
from rlkit.kernels import sparse_decode_attention as sda

from rlkit.bench import time_cuda_graph

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 2048, 16, 8, 128, 5632


def make_layer(rows: int, length: int, gen: torch.Generator) -> dict:
    dev, dt = "cuda", torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(dev)

    q_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return {
        "qkv": rnd(q_out, HIDDEN, scale=HIDDEN**-0.5),
        "o": rnd(HIDDEN, HEADS * HEAD_DIM, scale=HIDDEN**-0.5),
        "gate_up": rnd(2 * MLP, HIDDEN, scale=HIDDEN**-0.5),
        "down": rnd(HIDDEN, MLP, scale=MLP**-0.5),
        "norm": torch.ones(HIDDEN, dtype=dt, device=dev),
        "k": rnd(rows, KV_HEADS, length, HEAD_DIM),
        "v": rnd(rows, KV_HEADS, length, HEAD_DIM),
        "lengths": torch.randint(length - 64, length + 1, (rows,), generator=gen).to(dev),
    }


def stack(x: torch.Tensor, layers: list[dict], lo: int, hi: int, parts: str) -> torch.Tensor:
    """The layers over rows [lo, hi) of x [rows, hidden] (updated in place: the residual)."""
    x = x[lo:hi]
    B = hi - lo
    h = F.rms_norm(x, (HIDDEN,), layers[0]["norm"], 1e-6)
    for lay in layers:
        if parts in ("all", "gemms"):
            qkv = h @ lay["qkv"].t()
            q = qkv[:, : HEADS * HEAD_DIM].view(B, HEADS, HEAD_DIM)
        else:
            q = h[:, : HEADS * HEAD_DIM].view(B, HEADS, HEAD_DIM)
        if parts in ("all", "attention"):
            att = sda.sparse_decode_attention_triton(
                q, lay["k"][lo:hi], lay["v"][lo:hi], lay["lengths"][lo:hi]
            ).reshape(B, HEADS * HEAD_DIM)
        else:
            att = q.reshape(B, HEADS * HEAD_DIM)
        if parts in ("all", "gemms"):
            out = att @ lay["o"].t()
            h = fused_norm.add_rms_norm(x, out, lay["norm"], 1e-6)
            up = fused_norm.silu_mul(h @ lay["gate_up"].t())
            h = fused_norm.add_rms_norm(x, up @ lay["down"].t(), lay["norm"], 1e-6)
        else:
            h = fused_norm.add_rms_norm(x, att[:, :HIDDEN], lay["norm"], 1e-6)
    return h


def two_streams(x: torch.Tensor, layers: list[dict], streams: list[torch.cuda.Stream]) -> None:
    rows = x.shape[0]
    half = rows // 2
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)
    for s, (lo, hi) in zip(streams, ((0, half), (half, rows))):
        with torch.cuda.stream(s):
            stack(x, layers, lo, hi, "all")
    for s in streams:
        main.wait_stream(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=455)
    ap.add_argument("--length", type=int, default=576)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_overlap.py needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    layers = [make_layer(args.rows, args.length, gen) for _ in range(args.layers)]
    x = torch.randn(args.rows, HIDDEN, generator=gen).to(torch.bfloat16).cuda()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    times = {
        "one_stream": time_cuda_graph(
            lambda i: stack(x, layers, 0, args.rows, "all"), 1, args.repeats
        ),
        "two_streams": time_cuda_graph(lambda i: two_streams(x, layers, streams), 1, args.repeats),
        "attention_only": time_cuda_graph(
            lambda i: stack(x, layers, 0, args.rows, "attention"), 1, args.repeats
        ),
        "gemms_only": time_cuda_graph(
            lambda i: stack(x, layers, 0, args.rows, "gemms"), 1, args.repeats
        ),
    }
    row = {k + "_ms": 1e3 * v for k, v in times.items()}
    row["one_over_two"] = times["one_stream"] / times["two_streams"]
    row |= {"rows": args.rows, "length": args.length, "layers": args.layers}
    for k, v in row.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **row}, f, indent=1)


if __name__ == "__main__":
    main()
