"""Where a native-engine rollout's time goes: torch.profiler tables of one `generate` call.

    python benchmarks/profile_rollout.py --model DIR [--device cuda] [--mode dense|sparse|spec]
        [--batch 64] [--prompt-len 64] [--new-tokens 1024] [--budget 512] [--window 8]
        [--interval 64] [--policy snapkv] [--drafter sam+mtp] [--mtp DIR] [--out FILE]
        [--task arithmetic_set --task-args JSON --samples 8] [--temperature 1] [--top-p 1]

One warm-up `generate` (CUDA graphs captured, Triton kernels compiled, the first compression
reached), then one timed call without the profiler and one under it (ignore_eos; random
prompts, or with --task batch / samples of the task's first train prompts in the chat
template, each sampled `samples` times: what a drafter sees in an RL step). Prints the wall time of the timed call, its tokens/s and ms per
decode step, then two tables: device kernels by total device time, and host-side ops by
self CPU time (on a GPU a step bound by launches shows up as host time far above device time).
The tables also go to --out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rlkit.bench import _task_prompts, warmup_tokens
from rlkit.config.schema import KVCompressionConfig, SpeculativeConfig
from rlkit.models.loading import DTYPES, load_model, resolve_model_dir
from rlkit.models.mtp import init_mtp, load_mtp
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--mode", default="dense", choices=["dense", "sparse", "spec"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--drafter", default="sam+mtp")
    ap.add_argument("--num-draft-tokens", type=int, default=3)
    ap.add_argument("--mtp-vocab", type=int, default=0)
    ap.add_argument("--draft-chains", type=int, default=1)
    ap.add_argument("--mtp-draft", default="sample", choices=["sample", "argmax"])
    ap.add_argument("--mtp", default=None, help="a model directory with mtp.safetensors")
    ap.add_argument("--task", default=None, help="a built-in task's train prompts")
    ap.add_argument("--task-args", default="{}", help="the task's build arguments, JSON")
    ap.add_argument("--samples", type=int, default=8, help="samples per --task prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--rows", type=int, default=30, help="rows per table")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    model_dir = resolve_model_dir(a.model)
    dtype = DTYPES[a.dtype]
    model, tok = load_model(model_dir, dtype=dtype)
    model = model.to(a.device)
    compression = spec = mtp = None
    if a.mode == "sparse":
        compression = KVCompressionConfig(
            policy=a.policy,  # type: ignore[arg-type]
            budget=a.budget,
            window=a.window,
            interval=a.interval,
        )
    if a.mode == "spec":
        spec = SpeculativeConfig(
            drafter=a.drafter,  # type: ignore[arg-type]
            num_draft_tokens=a.num_draft_tokens,
            mtp_vocab=a.mtp_vocab,
            draft_chains=a.draft_chains,
            mtp_draft=a.mtp_draft,  # type: ignore[arg-type]
            sam_min_match=2,
        )
        if "mtp" in a.drafter:
            mtp = load_mtp(a.mtp or model_dir, model.args) or init_mtp(model.args, seed=0)
    engine = Engine(
        model, tok, max_batch_size=a.batch, dtype=dtype, kv_compression=compression,
        speculative=spec, mtp=mtp,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    if a.task:
        distinct = _task_prompts(
            a.task, max(1, a.batch // a.samples), 0, model_dir, json.loads(a.task_args)
        )
        prompts = [distinct[i // a.samples % len(distinct)] for i in range(a.batch)]
    else:
        prompts = [
            torch.randint(0, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)
        ]

    def run(new: int, seed: int) -> tuple[float, int]:
        params = SamplingParams(
            temperature=a.temperature, top_p=a.top_p, max_new_tokens=new, ignore_eos=True,
            seed=seed,
        )  # fmt: skip
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)

    run(
        warmup_tokens(compression, max(map(len, prompts))), 0
    )  # warm-up: through the first compression
    seconds, tokens = run(a.new_tokens, 1)
    acts = [ProfilerActivity.CPU]
    if a.device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        prof_seconds, _ = run(a.new_tokens, 2)
    steps = max(a.new_tokens - 1, 1)
    head = (
        f"profile_rollout: {a.mode} batch {a.batch} prompt {a.prompt_len} new {a.new_tokens} "
        f"on {a.device}: {seconds:.3f} s, {tokens / seconds:,.0f} tok/s, "
        f"{1000 * seconds / steps:.3f} ms per decode step (under the profiler {prof_seconds:.3f} s)"
    )
    if engine.stats:
        head += "\nstats: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(engine.stats.items()))
    ev = prof.key_averages()
    device_key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    tables = [
        head,
        "== by device time",
        ev.table(sort_by=device_key, row_limit=a.rows, max_name_column_width=70),
        "== by host (self CPU) time",
        ev.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=70),
    ]
    text = "\n".join(tables)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
