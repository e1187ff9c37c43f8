"""Sparse-RL at the memory wall: dense vs compressed-KV rollouts at equal batch and at equal
KV memory, each decode step against its bandwidth floor (issue 16).

    python benchmarks/sparse_memory_wall.py --model DIR [--device cuda] [--batch 64]
        [--prompt-len 64] [--new-tokens 4096] [--budget 512] [--window 8] [--interval 64]
        [--policy snapkv] [--compaction auto|fill|ordered] [--rounds 1] [--json FILE]

Three `rlkit bench rollout` rows of the native engine (ignore_eos, temperature 1, one timed
run each, after a warm-up that reaches the first compression):

1. equal batch: dense and sparse, `batch` sequences each, under `--kv-memory-gb` set to the
   dense batch's cache bytes (so the dense row's admitted count is measured, not assumed);
2. equal memory: sparse with as many sequences as that budget admits for the compressed cache
   (`CompressedKVCache.compressed_slot_bytes`, the engine's own sizing); the dense row of the
   same memory is row 1's (it admits `batch`).

Bandwidth: a device copy of `--copy-gb` GiB (read + write bytes / seconds, best of 5). Each
row's bytes per decode step: the weights a step reads (every linear layer and the LM head, not
the embedding table unless tied) plus the mean KV entries the step's attention reads, from
the cache's length schedule (dense: prompt + t; sparse: grows to the budget, then budget..
budget + interval between compressions) times the sequences; floor_ms = bytes / bandwidth.

`--rounds N` runs the three rows N times one after another and takes each row's median round
(a device's drift cannot decide a figure; a fresh process's first dense row was ~6% slower
until its warm-up became a whole run: `rlkit.bench._warm`).

Output JSON: device, equal_batch_speedup, equal_batch_kv_fraction,
equal_memory_sequences_ratio, equal_memory_speedup, bandwidth_gb_s, floors per row, and the
raw bench rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from rlkit.bench import rollout
from rlkit.config.schema import KVCompressionConfig
from rlkit.device import DTYPE_NAMES
from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.loading import DTYPES, resolve_model_dir
from rlkit.rollout.kv_cache import CompressedKVCache, KVCache, cache_fills


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes per second of a device copy (read + write), best of 5."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 2 / best


def weight_bytes(args: ModelArgs, itemsize: int) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table
    (rows gathered), which the LM head reads when tied."""
    with torch.device("meta"):
        model = Decoder(args)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    if not args.tie_word_embeddings:
        total -= model.model.embed_tokens.weight.numel()
    return total * itemsize


def mean_entries(prompt: int, new: int, cfg: KVCompressionConfig | None) -> float:
    """Mean KV entries per layer one sequence's decode steps attend to (steps 1..new-1: the
    first token comes from the prefill), following the cache's schedule."""
    length, since, total = prompt, 0, 0
    if cfg is not None and length > cfg.budget:
        length = cfg.budget
    for _ in range(new - 1):
        length += 1  # the step writes its token, then attends to every entry held
        total += length
        since += 1
        if cfg is not None and since >= cfg.interval:
            since = 0
            length = min(length, cfg.budget)
    return total / max(new - 1, 1)


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the median tokens/s (the lower middle one of an even count)."""
    ranked = sorted(rows, key=lambda r: r["tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=4096)
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--compaction", default="auto", choices=["auto", "fill", "ordered"])
    ap.add_argument("--copy-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the three rows this many times, one after another; each row's figure is "
        "its median round (by tokens/s), and every round's ratios are in the JSON",
    )
    ap.add_argument(
        "--also-interval",
        type=int,
        default=0,
        help="then one more equal-memory row at this compression interval (its own sequence "
        "count), added to the JSON as `equal_memory_other_interval` once the main rows are "
        "written",
    )
    a = ap.parse_args(argv)
    model_dir = resolve_model_dir(a.model)
    with open(f"{model_dir}/config.json") as f:
        margs = ModelArgs.from_hf(json.load(f))
    dtype = DTYPES[a.dtype]
    length = a.prompt_len + a.new_tokens
    if length > margs.max_position_embeddings:
        raise SystemExit(
            f"prompt + new tokens ({length}) exceed the model's max_position_embeddings "
            f"({margs.max_position_embeddings})"
        )

    def compressed(interval: int) -> tuple[KVCompressionConfig, int]:
        """The compression at this interval, and the bytes a sequence's cache takes under it."""
        c = KVCompressionConfig(
            policy=a.policy,
            budget=a.budget,
            window=a.window,
            interval=interval,  # type: ignore[arg-type]
            compaction=a.compaction,  # type: ignore[arg-type]
        )
        slot = CompressedKVCache.compressed_slot_bytes(
            margs.num_layers, min(length, a.budget + interval), length, margs.num_heads,
            margs.num_kv_heads, margs.head_dim, c, dtype, fills=cache_fills(c, a.device),
        )  # fmt: skip
        return c, slot

    cfg, sparse_slot = compressed(a.interval)
    dense_slot = KVCache.slot_bytes(
        margs.num_layers, length, margs.num_kv_heads, margs.head_dim, dtype
    )
    memory = a.batch * dense_slot
    gb = memory / 2**30  # exact: a power-of-two division
    n_sparse = memory // sparse_slot
    common = [
        "--model", model_dir, "--device", a.device, "--dtype", a.dtype, "--engines", "native",
        "--prompt-len", str(a.prompt_len), "--max-new-tokens", str(a.new_tokens),
        "--repeats", "1", "--policy", a.policy, "--budget", str(a.budget),
        "--window", str(a.window), "--interval", str(a.interval), "--kv-memory-gb", repr(gb),
        "--compaction", a.compaction,
    ]  # fmt: skip
    if a.threads:
        common += ["--threads", str(a.threads)]
    print(f"sparse_memory_wall: KV budget {memory / 2**20:.0f} MiB = dense x{a.batch}; sparse "
          f"admits {n_sparse} ({dense_slot / 2**20:.2f} vs {sparse_slot / 2**20:.2f} MiB per "
          "sequence)", flush=True)  # fmt: skip
    rounds: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    for _ in range(a.rounds):
        equal_batch = rollout([*common, "--batch", str(a.batch), "--modes", "dense,sparse"])
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        equal_memory = rollout([*common, "--batch", str(n_sparse), "--modes", "sparse"])
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rounds.append((equal_batch, equal_memory))
    bandwidth = copy_bandwidth(a.device, a.copy_gb)
    # Each row at its median round (by tokens/s): one round alone can catch a device that is
    # not yet at its steady speed (the H200's first dense run was ~7% slower, 2026-12-01).
    dense = _median_row([eb[0] for eb, _ in rounds])
    sparse = _median_row([eb[1] for eb, _ in rounds])
    mem_sparse = _median_row([em[0] for _, em in rounds])
    equal_batch, equal_memory = [dense, sparse], [mem_sparse]
    weights = weight_bytes(margs, dtype.itemsize)
    per_entry = 2 * margs.num_layers * margs.num_kv_heads * margs.head_dim * dtype.itemsize

    def floor(row: dict[str, Any], comp: KVCompressionConfig | None) -> dict[str, float]:
        """A row's bytes a decode step reads, its bandwidth floor, and its step against it."""
        seqs = row["seqs_admitted"]
        kv = seqs * mean_entries(a.prompt_len, a.new_tokens, comp) * per_entry
        floor_ms = 1000 * (weights + kv) / bandwidth
        return {
            "seqs": seqs,
            "kv_bytes_read_per_step": kv,
            "weight_bytes_per_step": weights,
            "floor_ms_per_step": floor_ms,
            "ms_per_step": row["ms_per_step"],
            "step_over_floor": row["ms_per_step"] / floor_ms,
        }

    floors = {
        "dense": floor(dense, None),
        "sparse_equal_batch": floor(sparse, cfg),
        "sparse_equal_memory": floor(mem_sparse, cfg),
    }
    out = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "equal_batch_speedup": sparse["tokens_per_s"] / dense["tokens_per_s"],
        "equal_batch_kv_fraction": sparse["kv_bytes_peak"] / dense["kv_bytes_peak"],
        "equal_memory_sequences_ratio": mem_sparse["seqs_admitted"] / dense["seqs_admitted"],
        "equal_memory_speedup": mem_sparse["tokens_per_s"] / dense["tokens_per_s"],
        "equal_memory_sequences_expected": n_sparse,
        "kv_memory_gb": gb,
        "bandwidth_gb_s": bandwidth / 1e9,
        "floors": floors,
        "settings": {
            "model": a.model,
            "dtype": DTYPE_NAMES.get(dtype, a.dtype),
            "batch": a.batch,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "policy": a.policy,
            "budget": a.budget,
            "window": a.window,
            "interval": a.interval,
            "compaction": a.compaction,
        },  # fmt: skip
        "acceptance": {},
        "rows": {"equal_batch": equal_batch, "equal_memory": equal_memory},
        "rounds": [
            {
                "dense_ms_per_step": eb[0]["ms_per_step"],
                "sparse_equal_batch_ms_per_step": eb[1]["ms_per_step"],
                "sparse_equal_memory_ms_per_step": em[0]["ms_per_step"],
                "equal_batch_speedup": eb[1]["tokens_per_s"] / eb[0]["tokens_per_s"],
                "equal_memory_speedup": em[0]["tokens_per_s"] / eb[0]["tokens_per_s"],
            }
            for eb, em in rounds
        ],
    }
    out["acceptance"] = {
        "equal_batch_speedup>=2": out["equal_batch_speedup"] >= 2.0,
        "equal_batch_kv_fraction<=0.15": out["equal_batch_kv_fraction"] <= 0.15,
        "equal_memory_sequences_ratio>=6": out["equal_memory_sequences_ratio"] >= 6.0,
        "equal_memory_speedup>=4": out["equal_memory_speedup"] >= 4.0,
    }
    summary = {k: v for k, v in out.items() if k not in ("rows", "settings")}
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"sparse_memory_wall: written to {a.json}")
    if a.also_interval:
        other, slot = compressed(a.also_interval)
        args = [*common, "--batch", str(memory // slot), "--modes", "sparse"]
        args[args.index("--interval") + 1] = str(a.also_interval)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        (row,) = rollout(args)
        at = floor(row, other)
        out["equal_memory_other_interval"] = {
            "interval": a.also_interval,
            "sequences_ratio": row["seqs_admitted"] / dense["seqs_admitted"],
            "speedup": row["tokens_per_s"] / dense["tokens_per_s"],
            **{k: at[k] for k in ("floor_ms_per_step", "ms_per_step", "step_over_floor")},
            "row": row,
        }
        print(
            json.dumps(
                {k: v for k, v in out["equal_memory_other_interval"].items() if k != "row"},
                indent=1,
            )
        )
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
