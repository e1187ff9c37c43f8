"""What a verify step's width costs on this CPU: the policy's decode forward (the fused CPU
step, bf16 where the CPU computes it natively) and its LM head over T new tokens a row, for
T = 1 (a plain step), 1 + k (one chain of k drafts) and 1 + C * k (C chains), at one batch,
each width timed in turn every round (the machine's drift falls on all alike); medians and
ratios to T = 1.

    python benchmarks/verify_width_cpu.py [--batch 2] [--widths 1,4,7,10,13] [--context 300]
        [--rounds 12]

Several draft chains a row (`rollout.speculative.draft_chains`) pay off where a step of 1 + C k
tokens a row costs about what 1 + k do; this says whether it does here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--widths", default="1,4,7,10,13")
    ap.add_argument("--context", type=int, default=300, help="entries each row already holds")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from rlkit.device import pick_dtype
    from rlkit.models.loading import load_model, resolve_model_dir
    from rlkit.rollout import Engine
    from rlkit.rollout.kv_cache import KVCache

    dtype = pick_dtype("auto", "cpu").dtype
    model, tok = load_model(resolve_model_dir("smollm2-135m-instruct"), dtype=dtype)
    engine = Engine(model, tok, dtype=dtype)  # packs the weights for the fused step
    m, args = engine.model, engine.model.args
    widths = [int(w) for w in a.widths.split(",")]
    B = a.batch
    cache = KVCache(
        args.num_layers, B, a.context + max(widths) + 1, args.num_kv_heads, args.head_dim,
        dtype, "cpu", True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def step(T: int) -> float:
        cache.lengths[:] = a.context
        cache.positions[:] = a.context
        tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
        t0 = time.perf_counter()
        positions = cache.begin_decode(B, T)
        if engine.fused_decode:
            hidden = m.forward_decode_fused(tokens, positions, cache)
        else:
            hidden = m.forward_cached(tokens, positions, cache)
        m.logits(hidden.reshape(B * T, -1))
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {T: [] for T in widths}
    for r in range(a.rounds + 2):
        for T in widths:
            dt = step(T)
            if r >= 2:  # two warm-up rounds
                times[T].append(dt)
    base = statistics.median(times[widths[0]])
    print(f"batch {B}, context {a.context}, {dtype}, fused {engine.fused_decode}")
    for T in widths:
        med = statistics.median(times[T])
        print(f"T = {T:3d}: {1000 * med:7.2f} ms  {med / base:5.2f}x")


if __name__ == "__main__":
    main()
