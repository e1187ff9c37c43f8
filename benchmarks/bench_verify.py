"""Time draft verification on CUDA: one program a row against the vocabulary split in chunks.

    python benchmarks/bench_verify.py [--rows 1,16,64] [--k 3] [--vocab 49152] [--json FILE]

A verify step's rule (`rlkit.kernels.spec_verify.verify_drafts_triton`) on random target rows
(softmax of randn * 4, SmolLM2's vocabulary by default) with deterministic drafts (SAM's, MTP's
argmax) and with draft distributions q, at `chunks` = 1 (one program a row) and the default
(up to 16 a row): device time per call, each replayed from a CUDA graph of 20 calls in
one process (`rlkit.bench.time_cuda_graph`), and whether both give the reference's tokens.
(The fifteenth session's `one_program` figures were an earlier single-launch kernel; since,
`chunks` = 1 runs the chunked kernels' two launches with one chunk.)
"""

from __future__ import annotations

import argparse
import json

import torch
from rlkit.kernels import spec_verify as sv

from rlkit.bench import time_cuda_graph


def _measure(n: int, k: int, vocab: int, with_q: bool, g: torch.Generator) -> dict:
    target = (torch.randn(n, k + 1, vocab, generator=g, device="cuda") * 4).softmax(-1)
    q = (torch.randn(n, k, vocab, generator=g, device="cuda") * 4).softmax(-1) if with_q else None
    drafts = torch.randint(0, vocab, (n, k), generator=g, device="cuda")
    drafts[::2, 0] = target[::2, 0].argmax(-1)  # some drafts the target likes
    num = torch.full((n,), k, device="cuda")
    u = torch.rand(n, k + 1, generator=g, device="cuda", dtype=torch.float64)
    args = (target, drafts, num, q, u)
    ref = sv.verify_drafts_reference(*args)
    row: dict = {"rows": n, "k": k, "vocab": vocab, "with_q": with_q}
    for name, chunks in (("one_program", 1), ("chunked", None)):
        row[f"{name}_us"] = 1e6 * time_cuda_graph(
            lambda i, c=chunks: sv.verify_drafts_triton(*args, chunks=c), 20, 5
        )
        got = sv.verify_drafts_triton(*args, chunks=chunks)
        row[f"{name}_equals_reference"] = all(map(torch.equal, got, ref))
    row["speedup"] = row["one_program_us"] / row["chunked_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for n in map(int, a.rows.split(",")):
        for with_q in (False, True):
            row = _measure(n, a.k, a.vocab, with_q, g)
            records.append(row)
            print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
