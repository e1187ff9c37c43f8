"""Time the rollout sampler on CUDA: the PyTorch path against the one-launch Triton kernel.

    python benchmarks/bench_sampler.py [--rows 64,455,512] [--vocab 32000,49152] [--json FILE]

Temperature-1 sampling of bf16 logit rows (the LM head's output), each variant timed side by
side in one process with CUDA events: a warm-up, then the median of --repeats calls.
Variants:
  torch        `rlkit.rollout.sampling.sample` on the whole batch (float32 copy, log-softmax,
               exp, float64 cumulative sum, searchsorted, gather; the path the engine took)
  torch-64     the same in chunks of 64 rows, as the engine's `scheduler.SAMPLE_ROWS` did
  triton       `rlkit.kernels.sample_rows.sample_rows_triton` (uniforms from the generator)
The tokens of torch and triton are compared from the same uniforms (they agree except within
float32 rounding of a boundary between two tokens' shares).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rlkit.kernels.sample_rows import sample_rows_reference, sample_rows_triton

from rlkit.rollout.sampling import SamplingParams, sample


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="64,455,512")
    ap.add_argument("--vocab", default="32000,49152")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampler.py needs CUDA")
    params = SamplingParams(temperature=1.0)
    rows = []
    for v in (int(x) for x in a.vocab.split(",")):
        for n in (int(x) for x in a.rows.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            logits = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
            u = torch.rand(n, generator=g, dtype=torch.float64, device="cuda")
            ref_tok, _ = sample_rows_reference(logits, 1.0, u)
            tri_tok, _ = sample_rows_triton(logits, 1.0, u)
            agree = float((ref_tok == tri_tok).float().mean())

            def whole(logits=logits, g=g):
                sample(logits, params, g)

            def chunked(n=n, logits=logits, g=g):
                for i in range(0, n, 64):
                    sample(logits[i : i + 64], params, g)

            def triton(n=n, logits=logits, g=g):
                u = torch.rand(n, generator=g, dtype=torch.float64, device="cuda")
                sample_rows_triton(logits, 1.0, u)

            t = {
                "torch": _time(whole, a.repeats),
                "torch-64": _time(chunked, a.repeats),
                "triton": _time(triton, a.repeats),
            }
            row = {"rows": n, "vocab": v, **{f"{k}_ms": x for k, x in t.items()},
                   "torch_64_over_triton": t["torch-64"] / t["triton"], "tokens_agree": agree}  # fmt: skip
            rows.append(row)
            print(
                f"rows {n:4d} vocab {v:6d}: torch {t['torch']:.3f} ms, torch-64 "
                f"{t['torch-64']:.3f} ms, triton {t['triton']:.3f} ms "
                f"({t['torch-64'] / t['triton']:.1f}x), tokens agree {agree:.4f}"
            )
    if a.json:
        out = {"device": torch.cuda.get_device_name(), "rows": rows}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
