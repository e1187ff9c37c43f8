"""The GEMMs of one decode step with the weights streaming from memory: the AVX2 GEMM
(`rlkit.kernels.cpu.linear` on `pack_linear` weights) beside oneDNN's prepacked GEMM (what
`Engine(prepack="onednn")` runs) and F.linear (MKL, plain weights).

    .venv/bin/python benchmarks/bench_gemm.py [--rows 32] [--layers 30] [--repeats 5]

A step is SmolLM2-135M's: per layer the fused q/k/v [960, 576], o [576, 576], fused gate/up
[3072, 576] and down [576, 1536] weights, then the LM head [49152, 576], all float32 and
distinct per layer (540 MB in all, far over the caches: every weight comes from DRAM, as in
the engine), times x of --rows rows. Prints the best and the median of --repeats steps
after a warm-up, and GFLOP/s of the best. --rows 2048 is a prefill's GEMMs (32 prompts of 64
tokens; the LM head then runs on --head-rows rows, as the engine samples only last tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernels

from rlkit.models.decoder import prepack

# (out, in) of one layer's fused linears, SmolLM2-135M
LAYER = ((960, 576), (576, 576), (3072, 576), (576, 1536))
HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--head-rows", type=int, default=None, help="default: --rows up to 64")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", default="avx2,onednn,mkl")
    args = ap.parse_args()
    head_rows = args.head_rows or min(args.rows, 64)
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(s, generator=g) * 0.02 for s in LAYER] for _ in range(args.layers)]
    head = torch.randn(HEAD, generator=g) * 0.02
    xs = {k: torch.randn(args.rows, k, generator=g) for k in (576, 1536)}
    x_head = torch.randn(head_rows, 576, generator=g)
    flops = 2 * args.rows * args.layers * sum(n * k for n, k in LAYER)
    flops += 2 * head_rows * HEAD[0] * HEAD[1]

    # engine -> (pack a weight, linear(x, packed))
    engines: dict[str, tuple[Callable, Callable]] = {
        "avx2": (cpu_kernels.pack_linear, cpu_kernels.linear),
        "onednn": (
            lambda w: prepack(w, min(args.rows, 64)),
            lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        ),
        "mkl": (lambda w: w, F.linear),
    }
    print(
        f"rows {args.rows} (LM head {head_rows}), {args.layers} layers, "
        f"{flops / 1e9:.2f} GFLOP a step, {torch.get_num_threads()} threads"
    )
    for name in args.engines.split(","):
        pack, linear = engines[name]
        layers = [[pack(w) for w in ws] for ws in weights]
        packed_head = pack(head)
        _step(linear, layers, packed_head, xs, x_head)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            _step(linear, layers, packed_head, xs, x_head)
            times.append(time.perf_counter() - t)
        best = min(times)
        print(
            f"{name:7s} best {best * 1e3:7.1f} ms  median {statistics.median(times) * 1e3:7.1f}"
            f" ms  {flops / best / 1e9:6.1f} GFLOP/s"
        )
        del layers, packed_head


def _step(linear: Callable, layers: list, head, xs: dict, x_head: torch.Tensor) -> None:
    for ws in layers:
        for (_, k), w in zip(LAYER, ws, strict=True):
            linear(xs[k], w)
    linear(x_head, head)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
