"""Time whole RL steps on the trainer's colocated worker: rollout, reward, advantage, learner
step and weight sync, each phase timed, on any device (a GPU above all).

    python benchmarks/bench_train_step.py --model M --device cuda --prompts 64 --n 8 \\
        --prompt-len 64 --max-new-tokens 1024 --steps 3 [--bench] [--json FILE] [key=value ...]

The worker is `rlkit.workers.colocated.ColocatedWorker`, the object `rlkit train` runs as its
one actor on a GPU, called in this process (no Ray: one step's Ray overhead is a few
milliseconds of actor calls). Prompts are random token ids of `--prompt-len` (the same ones
every step, so steps do the same work); sampling ignores EOS, so every sample is exactly
`--max-new-tokens` long; rewards are a seeded coin per sample, so GRPO advantages are non-zero
and the learner runs every sample. The first step is a warm-up (CUDA graphs, allocator); the
table gives the median of the rest:

- rollout_s, rollout_tokens_per_s: the generate call, generated tokens per second;
- learner_s, learner_tokens: the train_step call and the prompt + response tokens it ran;
- learner_mfu: 6 x parameters x learner tokens / learner_s / --peak-tflops (the convention
  of model FLOPs utilisation: no recomputation counted);
- sync_ms: the learner -> engine copy (ColocatedWorker.sync_engine);
- step_s: the whole step (the phases above plus building the batch).

--bench also runs `rlkit bench rollout`'s native engine on the same number of sequences,
prompt length and new tokens (every sequence its own prompt), in the same process, to compare
the trainer's rollout throughput with the engine's alone. key=value overrides go to the recipe
(e.g. train.micro_batch_size=16 model.gradient_checkpointing=true).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.device import cpu_summary, cuda_allocator_env
from rlkit.models.config import ModelArgs
from rlkit.rollout.sampling import SamplingParams
from rlkit.workers.colocated import ColocatedWorker


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _profiler(device: str) -> torch.profiler.profile:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, record_shapes=False)


def _write_profile(prof: torch.profiler.profile, path: str, title: str) -> None:
    """Top ops by self CPU time and by device time, appended to `path` (a profiled step is
    slower than a timed one: read shares, not the step's seconds)."""
    avg = prof.key_averages()
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"## {title}\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        if any(getattr(e, "self_device_time_total", 0) for e in avg):
            f.write(avg.table(sort_by="self_device_time_total", row_limit=20) + "\n")


def _write_step_trace(prof: torch.profiler.profile, path: str, title: str) -> None:
    """One profiled learner step in brief, appended to `path`: its top ops by self CPU time
    and the CUDA runtime and driver calls (allocator maps, frees, syncs) with their counts,
    to compare a slow step with a fast one."""
    avg = prof.key_averages()
    rows = sorted(avg, key=lambda e: -e.self_cpu_time_total)
    runtime = [e for e in rows if e.key.startswith(("cuda", "cu"))]
    with open(path, "a", encoding="utf-8") as f:
        total = sum(e.self_cpu_time_total for e in rows) / 1e3
        f.write(f"## {title}: self CPU {total:.1f} ms over {sum(e.count for e in rows)} events\n")
        for e in rows[:14]:
            f.write(f"  {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x {e.key}\n")
        f.write("  runtime/driver calls:\n")
        for e in runtime[:12]:
            f.write(f"  {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x {e.key}\n")


def _frame_key(frames: list[dict]) -> str:
    """The innermost rlkit line of an allocation's Python stack (else its innermost frame)."""
    for fr in frames:
        name = fr.get("filename", "")
        if "/rlkit/" in name or "/benchmarks/" in name:
            return f"{name.split('/rlkit/')[-1]}:{fr.get('line')} {fr.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"


def _write_memory_peak(path: str, baseline: int, worker: ColocatedWorker) -> None:
    """Replay the allocator's trace of the timed steps: the peak of tensors alive, and what
    was alive then (the baseline, held before recording: weights, master weights, optimizer
    states; then the recorded allocations grouped by the rlkit line that made them)."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live: dict[int, tuple[int, str]] = {}
    now = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _frame_key(ev.get("frames", [])))
            now += ev["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            now -= live.pop(ev["addr"])[0]
    groups: dict[str, int] = {}
    for size, key in at_peak.values():
        groups[key] = groups.get(key, 0) + size
    learner = worker.learner
    held = {
        "learner parameters": sum(p.numel() * p.element_size() for p in learner.model.parameters()),
        "learner gradients (if kept)": sum(
            p.grad.numel() * p.grad.element_size()
            for p in learner.model.parameters()
            if p.grad is not None
        ),
        "float32 master weights": sum(
            m.numel() * m.element_size()
            for m in (learner.master.parameters() if learner.master is not None else [])
        ),
        "optimizer states": sum(
            t.numel() * t.element_size()
            for st in learner.opt.state.values()
            for t in st.values()
            if torch.is_tensor(t) and t.is_cuda
        ),
        "engine parameters": sum(
            p.numel() * p.element_size() for p in worker.rollout.engine.model.parameters()
        ),
        "engine KV cache": (
            worker.rollout.engine.cache.allocated_bytes
            if worker.rollout.engine.cache is not None
            else 0
        ),
    }
    gib = 2**30
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"peak allocated over the timed steps: {torch.cuda.max_memory_allocated() / gib:.3f} "
            f"GiB (reserved {torch.cuda.max_memory_reserved() / gib:.3f}); baseline at the "
            f"first timed step {baseline / gib:.3f} GiB; recorded allocations alive at their "
            f"peak {peak / gib:.3f} GiB ({len(trace)} trace events)\n"
        )
        f.write("## held tensors now (end of the run)\n")
        for k, v in held.items():
            f.write(f"{v / gib:9.3f} GiB  {k}\n")
        f.write("## recorded allocations alive at the peak, by rlkit line\n")
        for key, size in sorted(groups.items(), key=lambda kv: -kv[1])[:40]:
            f.write(f"{size / gib:9.3f} GiB  {key}\n")
    print(open(path).read(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak")
    ap.add_argument("--bench", action="store_true", help="also time the engine alone")
    ap.add_argument("--json", default=None)
    ap.add_argument("--recipe", default=None, help="recipe file under the overrides")
    ap.add_argument(
        "--profile",
        default=None,
        help="write torch.profiler tables of step 1's rollout and learner step to this file",
    )
    ap.add_argument(
        "--trace",
        default=None,
        help="profile every timed learner step and append a brief of each (top ops, CUDA "
        "runtime calls) to this file",
    )
    ap.add_argument(
        "--memory",
        default=None,
        help="CUDA: record allocations over the timed steps and write what was alive at their "
        "peak, grouped by the rlkit line that allocated it, to this file",
    )
    ap.add_argument(
        "--keep-allocator-cache",
        action="store_true",
        help="an experiment: the colocated hand-offs skip torch.cuda.empty_cache (the "
        "allocator keeps its mapped memory between phases)",
    )
    ap.add_argument(
        "--vary-lengths",
        action="store_true",
        help="each step draws its new tokens in [max/4, max] (a new padded shape most steps, "
        "as real rollouts make)",
    )
    ap.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="an experiment: SDPA without its cuDNN backend (flash attention instead)",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    # As `rlkit train`'s actors; read when this process first touches CUDA (below).
    os.environ.update(cuda_allocator_env())
    cfg = load_recipe(
        args.recipe,
        [
            f"model.path={args.model}",
            f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.max_batch_size={args.prompts * args.n}",
            "optim.lr=1e-6",
            *args.overrides,
        ],
    )
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.keep_allocator_cache:
        torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    worker = ColocatedWorker(args.model, cfg, device=args.device)
    with open(f"{args.model}/config.json") as f:
        model_args = ModelArgs.from_hf(json.load(f))
    n_params = sum(p.numel() for p in worker.learner.model.parameters())
    g = torch.Generator().manual_seed(0)
    low = min(1000, model_args.vocab_size // 2)
    prompts = torch.randint(
        low, model_args.vocab_size, (args.prompts, args.prompt_len), generator=g
    ).tolist()
    coin = torch.Generator().manual_seed(1)
    lengths = torch.Generator().manual_seed(2)
    rows = []
    for step in range(args.steps + 1):
        if step == 1 and args.memory and args.device == "cuda":
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        new_tokens = args.max_new_tokens
        if args.vary_lengths:
            new_tokens = int(
                torch.randint(max(1, new_tokens // 4), new_tokens + 1, (1,), generator=lengths)
            )
        params = SamplingParams(
            temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=step
        )
        _sync(args.device)
        t0 = time.perf_counter()
        outs = worker.generate(prompts, params, n=args.n)
        _sync(args.device)
        t1 = time.perf_counter()
        rewards = torch.randint(0, 2, (len(outs),), generator=coin).float().tolist()
        batch = RolloutBatch.from_sequences(
            [prompts[o["prompt_index"]] for o in outs],
            [o["token_ids"] for o in outs],
            [o["logprobs"] for o in outs],
            rewards,
            [o["prompt_index"] for o in outs],
        )
        batch.advantages = ADVANTAGES.get(cfg.algorithm.advantage)(
            batch.rewards, batch.group_ids, batch.response_mask
        )
        t2 = time.perf_counter()
        cpu2 = time.process_time()
        prof = _profiler(args.device) if args.profile and step == 1 else None
        traced = bool(args.trace) and step > 0
        if prof is not None:
            with prof:
                metrics = worker.train_step(batch)
                _sync(args.device)
            _write_profile(prof, args.profile, f"learner step {step}")
        elif traced:
            prof = _profiler(args.device)
            with prof:
                metrics = worker.train_step(batch)
                _sync(args.device)
            t_traced = time.perf_counter() - t2
            _write_step_trace(prof, args.trace, f"learner step {step} ({t_traced:.3f} s)")
        else:
            metrics = worker.train_step(batch)
        _sync(args.device)
        t3 = time.perf_counter()
        cpu3 = time.process_time()
        sync_ms = worker.sync_engine()
        t4 = time.perf_counter()
        generated = sum(len(o["token_ids"]) for o in outs)
        tokens = metrics["actor/tokens"]
        row = {
            "step": step,
            "rollout_s": t1 - t0,
            "rollout_tokens_per_s": generated / (t1 - t0),
            "generated_tokens": generated,
            "learner_s": t3 - t2,
            "learner_tokens": tokens,
            # CPU seconds of every thread of this process in the learner step: near learner_s
            # when the host is the bound, below it when the host waits (GPU, scheduling).
            "learner_cpu_s": cpu3 - cpu2,
            "learner_mfu": 6 * n_params * tokens / (t3 - t2) / (args.peak_tflops * 1e12),
            "sync_ms": sync_ms,
            "step_s": t4 - t0,
            "rollout_gpu_peak_gb": worker.stats().get("gpu_peak_reserved_gb"),
            "learner_gpu_peak_gb": metrics.get("memory/learner_peak_reserved_gb"),
            "kv_cache_released": worker.stats().get("kv_cache_released"),
        }
        print(
            ("warm-up" if step == 0 else f"step {step}")
            + ": "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
            flush=True,
        )
        if step > 0:
            rows.append(row)
    if args.memory and args.device == "cuda":
        _write_memory_peak(args.memory, baseline, worker)
    summary: dict = {
        k: statistics.median(r[k] for r in rows)
        for k in rows[0]
        if k != "step" and rows[0][k] is not None
    }
    summary.update(
        device=torch.cuda.get_device_name() if args.device == "cuda" else cpu_summary(),
        params=n_params,
        prompts=args.prompts,
        n=args.n,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        overrides=args.overrides,
    )
    if args.bench:
        del worker
        torch.cuda.empty_cache() if args.device == "cuda" else None
        from rlkit import bench

        bench_rows = bench.rollout(
            [
                "--model", args.model, "--device", args.device,
                "--batch", str(args.prompts * args.n), "--prompt-len", str(args.prompt_len),
                "--max-new-tokens", str(args.max_new_tokens), "--engines", "native",
                "--repeats", "1",
            ]
        )  # fmt: skip
        summary["bench_tokens_per_s"] = bench_rows[0]["tokens_per_s"]
        summary["rollout_vs_bench"] = (
            summary["rollout_tokens_per_s"] / bench_rows[0]["tokens_per_s"]
        )
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "steps": rows}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
