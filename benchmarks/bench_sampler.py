"""Time the rollout sampler on CUDA: the PyTorch path against the Triton kernels.

    python benchmarks/bench_sampler.py [--rows 64,455,512] [--vocab 32000,49152] [--json FILE]

Temperature-1 sampling of bf16 logit rows (the LM head's output) from fixed uniforms, each
variant timed side by side in one process by replaying a CUDA graph of 20 calls between CUDA
events (device time: the engine launches these while the GPU runs earlier steps).
Variants:
  torch        the PyTorch path (`sample_rows_reference`: float32 copy, log-softmax, exp,
               float64 cumulative sum, searchsorted, gather) on the whole batch
  torch-64     the same in chunks of 64 rows, as the engine's `scheduler.SAMPLE_ROWS` did
  triton-row   the first Triton sampler (2026-11-29), kept here for the comparison: one
               program per row, three passes over its row
  triton       `rlkit.kernels.sample_rows.sample_rows_triton`: two launches, each row split
               over programs of 2,048 columns
  emit-ops     triton, then the engine's six emission ops (`Run.emit_one`)
  triton+emit  triton writing the emission itself (`Emit`, the engine's GPU path)
The tokens of torch and triton are compared from the same uniforms (they agree except within
float32 rounding of a boundary between two tokens' shares).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from rlkit.kernels.sample_rows import (
    Emit,
    emit_reference,
    sample_rows_reference,
    sample_rows_triton,
)

from rlkit.bench import time_cuda_graph


@triton.jit
def _sample_kernel(
    X,
    U,
    Tokens,
    Logp,
    V,
    stride_x,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    # Pass 1: the row's maximum of x / T.
    top = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, x * inv_t)
    m = tl.max(top, 0)
    # Pass 2: the total of exp(x / T - max), block sums accumulated in float64.
    total = tl.zeros([1], dtype=tl.float64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        total += tl.sum(tl.exp(x * inv_t - m).to(tl.float64), 0)
    z = tl.sum(total, 0)
    goal = tl.load(U + row) * z
    # Pass 3: the first token whose running sum exceeds u times the total.
    running = tl.zeros([1], dtype=tl.float64)
    token = tl.full([1], V - 1, dtype=tl.int64)
    found = tl.zeros([1], dtype=tl.int1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        e = tl.exp(x * inv_t - m).to(tl.float64)
        cdf = tl.sum(running, 0) + tl.cumsum(e, 0)
        hit = (cdf > goal) & valid
        first = tl.min(tl.where(hit, cols, V), 0).to(tl.int64)
        take = (first < V) & (found == 0)
        token = tl.where(take, first, token)
        found = found | take
        running += tl.sum(e, 0)
    x_tok = tl.load(base + token).to(tl.float32)
    logp = x_tok * inv_t - m - tl.log(z.to(tl.float32))
    one = tl.arange(0, 1)
    tl.store(Tokens + row + one, token)
    tl.store(Logp + row + one, logp)


def _triton_row(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    n, v = logits.shape
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    _sample_kernel[(n,)](
        logits, u, tokens, logp, v, logits.stride(0), 1.0 / temperature, BLOCK_V=1024,
        num_warps=4,
    )  # fmt: skip
    return tokens


def _emit_state(n: int) -> Emit:
    return Emit(
        out_tokens=torch.zeros(n, 4096, dtype=torch.long, device="cuda"),
        out_logp=torch.zeros(n, 4096, device="cuda"),
        seq=torch.arange(n, device="cuda"),
        count=torch.zeros(n, dtype=torch.long, device="cuda"),
        last=torch.zeros(n, dtype=torch.long, device="cuda"),
        done=torch.zeros(n, dtype=torch.bool, device="cuda"),
        stop_ids=torch.tensor([2], device="cuda"),
    )


def _time(fn, repeats: int, calls: int = 20) -> float:
    """Device milliseconds a call (`rlkit.bench.time_cuda_graph`: the host's launch time does
    not count; eager timing, this script's first version, measured the host at these sizes)."""
    return 1e3 * time_cuda_graph(lambda i: fn(), calls, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="64,455,512")
    ap.add_argument("--vocab", default="32000,49152")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampler.py needs CUDA")
    rows = []
    for v in (int(x) for x in a.vocab.split(",")):
        for n in (int(x) for x in a.rows.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            logits = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
            u = torch.rand(n, generator=g, dtype=torch.float64, device="cuda")
            ref_tok, _ = sample_rows_reference(logits, 1.0, u)
            tri_tok, _ = sample_rows_triton(logits, 1.0, u)
            agree = float((ref_tok == tri_tok).float().mean())
            agree_row = float((ref_tok == _triton_row(logits, 1.0, u)).float().mean())

            def whole(logits=logits, u=u):
                sample_rows_reference(logits, 1.0, u)

            def chunked(n=n, logits=logits, u=u):
                for i in range(0, n, 64):
                    sample_rows_reference(logits[i : i + 64], 1.0, u[i : i + 64])

            def triton_row(logits=logits, u=u):
                _triton_row(logits, 1.0, u)

            def triton_(logits=logits, u=u):
                sample_rows_triton(logits, 1.0, u)

            state = _emit_state(n)

            def emit_ops(logits=logits, u=u, state=state):
                emit_reference(state, *sample_rows_triton(logits, 1.0, u))
                state.count.zero_()

            def fused(logits=logits, u=u, state=state):
                sample_rows_triton(logits, 1.0, u, emit=state)
                state.count.zero_()

            t = {
                "torch": _time(whole, a.repeats),
                "torch-64": _time(chunked, a.repeats),
                "triton-row": _time(triton_row, a.repeats),
                "triton": _time(triton_, a.repeats),
                "emit-ops": _time(emit_ops, a.repeats),
                "triton+emit": _time(fused, a.repeats),
            }
            row = {"rows": n, "vocab": v, **{f"{k}_ms": x for k, x in t.items()},
                   "torch_64_over_triton": t["torch-64"] / t["triton"],
                   "triton_row_over_triton": t["triton-row"] / t["triton"],
                   "emit_ops_over_fused": t["emit-ops"] / t["triton+emit"],
                   "tokens_agree": agree, "tokens_agree_triton_row": agree_row}  # fmt: skip
            rows.append(row)
            print(
                f"rows {n:4d} vocab {v:6d}: "
                + ", ".join(f"{k} {x:.4f} ms" for k, x in t.items())
                + f"; triton-row / triton {t['triton-row'] / t['triton']:.2f}x, emit-ops / "
                f"triton+emit {t['emit-ops'] / t['triton+emit']:.2f}x, tokens agree {agree:.4f}"
            )
    if a.json:
        out = {"device": torch.cuda.get_device_name(), "rows": rows}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
