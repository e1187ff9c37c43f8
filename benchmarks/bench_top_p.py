"""Time top-p's nucleus on CUDA: the full sort the GPU path takes against top-k candidates.

    python benchmarks/bench_top_p.py [--rows 64,256,512] [--vocab 49152]
        [--kernels values:2048,keys:2048] [--json FILE]

bf16 logit rows (randn * 4: a peaked row, as a language model's) through
`sampling_logprobs` at top-p 0.7 (the recipes' setting: temperature, softmax, the nucleus
floor, the mask, log-softmax; on CUDA the floor is `rlkit.kernels.top_p`'s kernel) and at
top-p 1 (the same without the nucleus); the floor alone by the sort
(`top_p_floor_reference`) and by the kernel at each `--kernels` setting (search:block; the
GPU path takes `top_p.SEARCH` and `top_p.BLOCK`), with whether each agrees; and the floor from the
`k` most likely tokens (`torch.topk`) for k in 64, 256, 1024 (exact only for rows whose
nucleus lies within them). Device time per call, each variant replayed from a CUDA graph of 20 calls in
one process (`rlkit.bench.time_cuda_graph`), with the share of rows whose nucleus the
candidates hold.
"""

from __future__ import annotations

import argparse
import json

import torch
from rlkit.kernels import top_p as tp

from rlkit.bench import time_cuda_graph
from rlkit.rollout.sampling import SamplingParams, sampling_logprobs


def _measure(
    n: int, vocab: int, top_p: float, g: torch.Generator, kernels: list[tuple[str, int]]
) -> dict:
    logits = (torch.randn(n, vocab, generator=g, device="cuda") * 4).to(torch.bfloat16)
    nucleus = SamplingParams(temperature=1.0, top_p=top_p)
    plain = SamplingParams(temperature=1.0)
    row: dict = {"rows": n, "vocab": vocab}
    row["sampling_top_p_us"] = 1e6 * time_cuda_graph(
        lambda i: sampling_logprobs(logits, nucleus), 20, 5
    )
    row["plain_us"] = 1e6 * time_cuda_graph(lambda i: sampling_logprobs(logits, plain), 20, 5)
    probs = torch.softmax(logits.float(), dim=-1)
    scaled = logits.float()
    row["sort_floor_us"] = 1e6 * time_cuda_graph(
        lambda i: tp.top_p_floor_reference(scaled, top_p), 20, 5
    )
    want = tp.top_p_floor_reference(scaled, top_p)
    for search, block in kernels:
        name = f"kernel_{search}_b{block}"
        row[f"{name}_floor_us"] = 1e6 * time_cuda_graph(
            lambda i, s=search, b=block: tp.top_p_floor_triton(scaled, top_p, block=b, search=s),
            20,
            5,
        )
        got = tp.top_p_floor_triton(scaled, top_p, block=block, search=search)
        row[f"{name}_equals_sort"] = bool(torch.equal(got, want))
    for k in (64, 256, 1024):

        def floor(i: int, k: int = k) -> torch.Tensor:
            top, idx = torch.topk(probs, k, dim=-1)
            return tp.floor_of_sorted(logits.float().gather(-1, idx), top, top_p)

        row[f"topk{k}_floor_us"] = 1e6 * time_cuda_graph(floor, 20, 5)
        held = torch.topk(probs, k, dim=-1).values.sum(-1) >= top_p
        row[f"topk{k}_rows_held"] = float(held.float().mean())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--kernels",
        default="values:2048,keys:2048,values:1024",
        help="the kernel's settings to time, search:block (values: the GPU path's)",
    )
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for n in map(int, a.rows.split(",")):
        kernels = [(k.split(":")[0], int(k.split(":")[1])) for k in a.kernels.split(",")]
        row = _measure(n, a.vocab, a.top_p, g, kernels)
        records.append(row)
        print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
