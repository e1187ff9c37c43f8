"""The two compactions of a compressed cache's rows on CUDA, side by side (issue 16): the
ordered one (`kv_compress.compact_rows`: every kept entry to the front, in order) against the
fill one (`kv_compress.fill_plan` + `fill_rows`: only the kept entries past the budget, into
the evicted places below it, and the head's new order), at the memory wall's shape; the plan
as one Triton launch and as its PyTorch reference (`fill_moves` and a dozen launches).

    python benchmarks/bench_compaction.py [--rows 64,455] [--kv-heads 8] [--head-dim 128]
        [--budget 512] [--interval 64] [--json FILE]

Per row count: one store [rows, KVH, budget + interval, D] bf16 (one layer's K or V), a kept
set of `budget` entries a row from random scores (the window's last entries among them), each
op replayed from a CUDA graph (`rlkit.bench.time_cuda_graph`, median of 20), device
microseconds per call: one store, and a layer's K and V (what a compression does a layer).
The results are checked against the references first.
"""

from __future__ import annotations

import argparse
import json

import torch
from rlkit.kernels import kv_compress as kc

from rlkit.bench import time_cuda_graph


def measure(R: int, a: argparse.Namespace) -> dict:
    L, b = a.budget + a.interval, a.budget
    g = torch.Generator(device="cuda").manual_seed(R)
    store = torch.randn(R, a.kv_heads, L, a.head_dim, device="cuda", generator=g)
    store = store.to(torch.bfloat16)
    rows = torch.arange(R, device="cuda")
    lengths = torch.full((R,), L, device="cuda")
    scores = torch.rand(R, a.kv_heads, L, device="cuda", generator=g)
    chosen = kc.keep_top(scores, lengths, b, a.window)  # ascending; the fill takes any order
    want, got = store.clone(), store.clone()
    kc.compact_rows_reference(want, rows, chosen)
    kc.compact_rows(got, rows, chosen)
    assert torch.equal(got, want), "compact_rows"
    src, dst = kc.fill_moves(chosen, b, L)
    want, got = store.clone(), store.clone()
    kc.fill_rows_reference(want, rows, src, dst)
    kc.fill_rows(got, rows, src, dst)
    assert torch.equal(got, want), "fill_rows"
    moved = int((src >= 0).sum())
    got = kc.fill_plan(chosen, b, L)
    assert all(torch.equal(x, y) for x, y in zip(got, kc.fill_plan_reference(chosen, b, L)))
    values = store.clone()  # a layer's K and V

    def fill_layer(plan) -> None:
        s, d, _ = plan(chosen, b, L)
        kc.fill_rows(store, rows, s, d)
        kc.fill_rows(values, rows, s, d)

    def ordered_layer(_i: int) -> None:
        kc.compact_rows(store, rows, chosen)
        kc.compact_rows(values, rows, chosen)

    t_ordered = time_cuda_graph(lambda _i: kc.compact_rows(store, rows, chosen), 20, 20)
    t_fill = time_cuda_graph(lambda _i: kc.fill_rows(store, rows, src, dst), 20, 20)
    t_layer_ordered = time_cuda_graph(ordered_layer, 20, 20)
    t_layer_torch = time_cuda_graph(lambda _i: fill_layer(kc.fill_plan_reference), 20, 20)
    t_layer_fill = time_cuda_graph(lambda _i: fill_layer(kc.fill_plan), 20, 20)
    return {
        "rows": R, "kv_heads": a.kv_heads, "entries": L, "budget": b, "head_dim": a.head_dim,
        "moved_per_row_head": moved / (R * a.kv_heads), "ordered_us": 1e6 * t_ordered,
        "fill_us": 1e6 * t_fill, "layer_ordered_us": 1e6 * t_layer_ordered,
        "layer_fill_torch_plan_us": 1e6 * t_layer_torch, "layer_fill_us": 1e6 * t_layer_fill,
        "layer_ordered_over_fill": t_layer_ordered / t_layer_fill,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default="64,455")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_compaction.py needs CUDA")
    out = []
    for R in (int(r) for r in a.rows.split(",")):
        row = measure(R, a)
        out.append(row)
        print(
            f"rows {R:4d}: one store ordered {row['ordered_us']:7.1f} us, fill "
            f"{row['fill_us']:6.1f} us ({row['moved_per_row_head']:.1f} entries a row and head); "
            f"a layer's K and V: ordered {row['layer_ordered_us']:7.1f} us, fill with the "
            f"PyTorch plan {row['layer_fill_torch_plan_us']:7.1f} us, with the Triton plan "
            f"{row['layer_fill_us']:7.1f} us, ordered / fill {row['layer_ordered_over_fill']:.2f}x",
            flush=True,
        )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
