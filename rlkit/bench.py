"""`rlkit bench rollout`: the same prompts through each engine and mode, side by side.

    rlkit bench rollout [--model M] [--batch 32] [--prompt-len 64] [--max-new-tokens 256]
                        [--modes dense,sparse,spec] [--drafter sam,mtp,sam+mtp]
                        [--task countdown] [--engines native,hf,vllm] [--json FILE]
                        [--kv-memory-gb X]

Every row generates `batch` sequences of exactly `max_new_tokens` tokens (sampling with
ignore_eos, so every engine does the same work) from the same prompts (random tokens of
`prompt-len`, or with `--task` the task's first train prompts in the chat template, whose
text a drafter can predict), after one warm-up run, and reports the median of `--repeats`
timed runs (one row's after another's, or with `--interleave` repeat i of every row before
repeat i + 1 of any, so that the machine's drift falls on every row alike). With
`--stop-at-eos` each sequence ends at its EOS as in an RL rollout (a drafter is then
measured on the text it drafts in training, not on what a model writes after its answer),
and tok/s counts what was generated:

- tokens_per_s: generated tokens / wall seconds of the generate call (for vLLM, the seconds
  spent inside `LLM.generate`, measured in its server: no pipe or pickling time);
- prefill_s: a one-token generate of the same prompts (prefill plus one sampling step);
- ms_per_step: (generate seconds - prefill_s) / (max_new_tokens - 1), one decode step of
  the whole batch (not with `--stop-at-eos`: the batch shrinks as sequences end);
- tokens: generated tokens of the last timed run (`--stop-at-eos`: of all timed runs, and
  tokens_per_s their sum over the sum of their seconds);
- kv_bytes_peak: K/V storage the engine held (native: its preallocated cache as allocated;
  hf: the dynamic cache at its largest, batch x (prompt + new) x bytes per token; vllm: the
  same count, since its pool is sized by a setting, not by the request);
- seqs_admitted: sequences decoded at once (native: the engine's admitted batch, which
  `--kv-memory-gb` sizes by KV bytes per sequence, so a sparse row admits more than a dense
  one within the same memory; other engines: `--batch`);
- peak_mem_bytes: the largest resident memory of the generating process during the row (on
  CUDA: the GPU's peak allocation);
- ratio_vs_native_dense: tokens_per_s over the native dense row's;
- spec rows: accept_len_mean (tokens emitted per sequence and verify step: accepted drafts
  + 1), drafted_per_step (drafts per sequence and step), draft_ms (drafting per step).

Modes are modes of the native engine: `dense`, `sparse` (a compressed KV cache, policy
and budget from the options) and `spec` (speculative decoding, one row per `--drafter`; the
MTP module is the one beside `--model`'s checkpoint or `--mtp DIR`'s, else an untrained one,
which the settings line says). Other engines run dense only, except two ablations of the
native engine, for what each lever is worth: `native-plain` (no packed weights),
`native-onednn` (oneDNN-prepacked weights, where native packs them for the AVX2 GEMM: a
float32 engine on an AVX2 CPU) and `native-torch` (PyTorch ops in the decode step instead of
the C kernels) on a CPU, and
`native-eager` (decode steps launched one kernel at a time, not replayed from CUDA graphs)
on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

from rlkit.config.schema import DEFAULT_MODEL, KVCompressionConfig, VLLMConfig
from rlkit.device import cpu_summary, pick_dtype, synchronize
from rlkit.models.config import ModelArgs
from rlkit.models.loading import DTYPES, load_model, resolve_model_dir
from rlkit.rollout.sampling import SamplingParams
from rlkit.workers.placement import local_device

MODES = ("dense", "sparse", "spec")
DRAFTER_NAMES = ("mtp", "sam", "sam+mtp")
# Ablations of the native engine, to show what each CPU lever is worth on this machine:
# native-plain without packed weights (`Engine(prepack=False)`), native-onednn with
# oneDNN-prepacked ones instead of the default layout (`Engine(prepack="onednn")`),
# native-torch with PyTorch ops in the decode step instead of the C kernels
# (`Engine(cpu_kernels=False)`), native-eager without CUDA-graph decode steps
# (`Engine(cuda_graphs=False)`).
ENGINES = ("native", "native-plain", "native-onednn", "native-torch", "native-eager", "hf", "vllm")
_MODAL = ("native", "native-plain", "native-onednn", "native-torch", "native-eager")
# Engine(prepack=...) of the rows that do not take the default layout.
_PREPACK: dict[str, bool | str] = {"native-plain": False, "native-onednn": "onednn"}
COLUMNS = (
    ("engine", "engine", "{}"),
    ("mode", "mode", "{}"),
    ("drafter", "drafter", "{}"),
    ("seqs_admitted", "seqs", "{:.0f}"),
    ("tokens", "tokens", "{}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("ms_per_step", "ms/step", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("kv_bytes_peak", "KV peak MiB", "{:.1f}"),
    ("peak_mem_bytes", "peak mem GiB", "{:.2f}"),
    ("ratio_vs_native_dense", "vs native dense", "{:.2f}x"),
    ("accept_len_mean", "acc len", "{:.2f}"),
    ("drafted_per_step", "drafted/step", "{:.2f}"),
    ("draft_ms", "draft ms", "{:.1f}"),
)


class _PeakRSS:
    """Largest RSS of a process while the block runs (sampled every 20 ms)."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.02)

    def __enter__(self) -> _PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class _Runner:
    """One engine in one mode: `generate(max_new_tokens)` returns (seconds, tokens made)."""

    engine: str
    mode: str
    generate: Callable[[int, int], tuple[float, int]]
    kv_bytes: Callable[[], float]
    pid: int | None = None
    close: Callable[[], None] = lambda: None
    drafter: str | None = None
    # The engine's figures of its last generate (spec rows: acceptance, admitted sequences).
    stats: Callable[[], dict[str, float]] = dict
    warmup_tokens: int = 8


def time_cuda_graph(fn: Callable[[int], Any], calls: int, repeats: int) -> float:
    """Device seconds per call of fn(i): `calls` calls captured in one CUDA graph (after a
    warm-up outside the capture), replayed between CUDA events, median of `repeats`. The
    host's launch time does not count (the engine launches while the GPU runs earlier steps);
    the kernel benchmarks under benchmarks/ time with it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):  # compile and warm up outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def warmup_tokens(compression: KVCompressionConfig | None, longest_prompt: int) -> int:
    """New tokens of a warm-up `generate` that reaches the first real compression of the
    longest prompt's sequence (the compression kernels compile there, and a timed run must not
    pay for that): its cache is checked every `interval` decode steps and compressed once it
    holds more than `budget` entries. 8 without compression."""
    if compression is None or compression.policy == "none":
        return 8
    short = compression.budget + 1 - longest_prompt
    return compression.interval * max(1, -(-short // compression.interval)) + 2


def _model_args(model_dir: str) -> ModelArgs:
    with open(f"{model_dir}/config.json") as f:
        return ModelArgs.from_hf(json.load(f))


def _bytes_per_token(model_dir: str, dtype: torch.dtype) -> int:
    """K and V of one token over all layers, as a dense KVCache stores them."""
    a = _model_args(model_dir)
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * dtype.itemsize


def _params(args: argparse.Namespace, new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=new_tokens,
        ignore_eos=not args.stop_at_eos,
        seed=seed,
    )


def _native(
    args: argparse.Namespace,
    model_dir: str,
    mode: str,
    prompts,
    name: str = "native",
) -> _Runner:
    from rlkit.config.schema import SpeculativeConfig
    from rlkit.models.mtp import init_mtp, load_mtp
    from rlkit.rollout.engine import Engine

    dtype = DTYPES[args.dtype]
    model, tok = load_model(model_dir, dtype=dtype)
    model = model.to(args.device)
    drafter, spec, mtp = None, None, None
    if mode.startswith("spec:"):
        drafter = mode.split(":", 1)[1]
        spec = SpeculativeConfig(
            drafter=drafter,  # type: ignore[arg-type]
            num_draft_tokens=args.num_draft_tokens,
            sam_min_match=args.sam_min_match,
            sam_match=args.sam_match,
            mtp_vocab=args.mtp_vocab,
            mtp_draft=args.mtp_draft,
            max_batch=args.spec_max_batch,
            tail_rows=args.tail_rows,
            tail_draft_tokens=args.tail_draft_tokens,
            draft_chains=args.draft_chains,
            tail_draft_chains=args.tail_draft_chains,
            chain_kinds=args.chain_kinds.split(","),
            adaptive_draft=args.adaptive_draft,
        )
        if "mtp" in drafter:
            mtp = load_mtp(args.mtp or model_dir, model.args) or init_mtp(model.args, seed=0)
        mode = "spec"
    compression = None
    if mode == "sparse":
        compression = KVCompressionConfig(
            policy=args.policy,
            budget=args.budget,
            window=args.window,
            interval=args.interval,
            compaction=args.compaction,
        )
    engine = Engine(
        model,
        tok,
        max_batch_size=args.batch,
        dtype=dtype,
        kv_compression=compression,
        prepack=_PREPACK.get(name),
        cpu_kernels=name != "native-torch",
        cuda_graphs=False if name == "native-eager" else None,
        speculative=spec,
        mtp=mtp,
        kv_memory_gb=args.kv_memory_gb,
        time_steps=args.step_times,
    )

    def generate(new_tokens: int, seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, _params(args, new_tokens, seed))
        synchronize(args.device)
        return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)

    return _Runner(
        name,
        mode,
        generate,
        lambda: float(engine.stats["kv_bytes_peak"]),
        drafter=drafter,
        stats=lambda: dict(engine.stats),
        warmup_tokens=warmup_tokens(compression, max(len(p) for p in prompts)),
    )


def _hf(args: argparse.Namespace, model_dir: str, mode: str, prompts) -> _Runner:
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(args.device)
    ids = torch.tensor(prompts, device=args.device)  # equal lengths: no padding
    mask = torch.ones_like(ids)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    per_token = _bytes_per_token(model_dir, dtype)

    @torch.inference_mode()
    def generate(new_tokens: int, seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=args.top_p,
            top_k=args.top_k or None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # ignore EOS
            use_cache=True,
            pad_token_id=pad,
        )
        synchronize(args.device)
        return time.perf_counter() - t0, int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    return _Runner(
        "hf",
        mode,
        generate,
        lambda: float(args.batch * (args.prompt_len + args.max_new_tokens) * per_token),
    )


def _vllm(args: argparse.Namespace, model_dir: str, mode: str, prompts) -> _Runner:
    from rlkit.rollout.vllm_engine import VLLMEngine

    cfg = VLLMConfig(python=args.vllm_python, cpu_kv_cache_gb=args.vllm_kv_gb)
    engine = VLLMEngine(
        model_dir,
        cfg,
        dtype=args.dtype,
        max_batch_size=args.batch,
        max_seq_len=args.prompt_len + args.max_new_tokens,
    )
    per_token = _bytes_per_token(model_dir, DTYPES[args.dtype])

    def generate(new_tokens: int, seed: int) -> tuple[float, int]:
        outs = engine.generate(prompts, _params(args, new_tokens, seed))
        return engine.last_generate_seconds, sum(len(o.token_ids) for o in outs)

    proc = engine._proc
    return _Runner(
        "vllm",
        mode,
        generate,
        lambda: float(args.batch * (args.prompt_len + args.max_new_tokens) * per_token),
        pid=proc.pid if proc is not None else None,
        close=engine.close,
    )


_BUILDERS: dict[str, Callable[..., _Runner]] = {
    "native": _native,
    "native-plain": functools.partial(_native, name="native-plain"),
    "native-onednn": functools.partial(_native, name="native-onednn"),
    "native-torch": functools.partial(_native, name="native-torch"),
    "native-eager": functools.partial(_native, name="native-eager"),
    "hf": _hf,
    "vllm": _vllm,
}


@dataclasses.dataclass
class _Timed:
    """One runner's timed repeats: seconds, tokens and accepted lengths per run."""

    prefill: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    accepts: list[float | None] = dataclasses.field(default_factory=list)


def _warm(runner: _Runner, args: argparse.Namespace) -> _Timed:
    """Warm-up (allocation, thread pools, first kernels: CUDA graphs, Triton compilation),
    then the prefill's median time. On a GPU the warm-up is a whole run where a short one
    would not build what the timed run uses:
    - where sequences retire at different steps (at their EOS, or a speculative row's own
      pace): the engine captures a CUDA graph per padded row count (and a verify step's draft
      length and chains) when a run first reaches it (the 2026-11-30 H200 bench's first
      speculative repeat, after an 8-token warm-up, took 1.7x the others);
    - a native dense row: its cache is sized by the run's new tokens, and the kernels a step takes
      depend on that capacity (the one-launch RoPE + attention up to 1,024 entries, two
      launches past it). After an 8-token warm-up the 4,096-token timed run compiled
      `_rope_append_kernel` and a second attention variant, ~1 s: a fresh process's first
      dense memory-wall row was ~6% slower than the next (2026-12-01, H200,
      `benchmarks/gpu/dense_first_run.sh`).
    A compressed row's cache is sized by its budget and interval: the warm-up that reaches
    its first compression (`warmup_tokens`) builds it."""
    n = min(args.max_new_tokens, runner.warmup_tokens)
    if args.device.startswith("cuda") and (
        args.stop_at_eos or runner.drafter or (runner.engine, runner.mode) == ("native", "dense")
    ):
        n = args.max_new_tokens
    runner.generate(n, 0)
    prefill = statistics.median(runner.generate(1, 100 + i)[0] for i in range(args.repeats))
    return _Timed(prefill)


def _repeat(runner: _Runner, args: argparse.Namespace, timed: _Timed, i: int) -> None:
    """Timed run i (seed 1 + i)."""
    seconds, tokens = runner.generate(args.max_new_tokens, 1 + i)
    timed.times.append(seconds)
    timed.counts.append(tokens)
    if runner.drafter:
        timed.accepts.append(runner.stats().get("spec/accept_len_mean"))


def _measure(runner: _Runner, args: argparse.Namespace) -> dict[str, Any]:
    timed = _warm(runner, args)
    cuda = args.device.startswith("cuda") and runner.pid is None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _PeakRSS(runner.pid) as mem:
        for i in range(args.repeats):
            _repeat(runner, args, timed, i)
    peak_mem = torch.cuda.max_memory_allocated() if cuda else mem.peak
    return _row(runner, args, timed, peak_mem)


def _measure_interleaved(runners: list[_Runner], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--interleave`: every runner warmed up, then repeat i of each in turn, so that a drift
    of the machine's speed falls on every row alike. Peak memory is not reported: the runners
    share the process (and the device) while they are timed."""
    timed = [_warm(r, args) for r in runners]
    for i in range(args.repeats):
        for r, t in zip(runners, timed, strict=True):
            _repeat(r, args, t, i)
    return [_row(r, args, t, None) for r, t in zip(runners, timed, strict=True)]


def _measure_plan(
    plan: list[tuple[str, str]], args: argparse.Namespace, model_dir: str, prompts: list
) -> list[dict[str, Any]]:
    """A row per (engine, mode): each runner built, measured and closed in turn; with
    `--interleave` all built first and timed together (`_measure_interleaved`)."""

    def build(engine: str, mode: str) -> _Runner:
        print(f"rlkit bench: {engine} {mode} ...", file=sys.stderr, flush=True)
        return _BUILDERS[engine](args, model_dir, mode, prompts)

    if not args.interleave:
        rows = []
        for engine, mode in plan:
            runner = build(engine, mode)
            try:
                rows.append(_measure(runner, args))
            finally:
                runner.close()
                del runner
                gc.collect()
        return rows
    runners: list[_Runner] = []
    try:
        for engine, mode in plan:
            runners.append(build(engine, mode))
        print("rlkit bench: timing the rows interleaved ...", file=sys.stderr, flush=True)
        return _measure_interleaved(runners, args)
    finally:
        for runner in runners:
            runner.close()
        runners.clear()
        gc.collect()


def _row(
    runner: _Runner, args: argparse.Namespace, timed: _Timed, peak_mem: float | None
) -> dict[str, Any]:
    n_new = args.max_new_tokens
    times, counts, accepts, prefill = timed.times, timed.counts, timed.accepts, timed.prefill
    tokens = counts[-1]
    if tokens != args.batch * n_new and not args.stop_at_eos:
        raise RuntimeError(
            f"{runner.engine}/{runner.mode} generated {tokens} tokens, expected "
            f"{args.batch} x {n_new}: the rows would not be comparable"
        )
    seconds = statistics.median(times)
    stats = runner.stats()
    spec = stats if runner.drafter else {}
    if args.stop_at_eos:
        # Runs of different lengths: throughput over all of them (a median of per-run rates
        # would weigh a 5-token run like a 256-token one), and the accepted length per
        # sequence step over all of them (each run's mean weighted by its steps, tokens / mean).
        tokens, tokens_per_s = sum(counts), sum(counts) / sum(times)
        means = [a for a in accepts if a]
        if accepts and len(means) == len(accepts):
            steps = sum(c / a for c, a in zip(counts, means, strict=True))
            spec = {**spec, "spec/accept_len_mean": tokens / steps}
    else:
        tokens_per_s = counts[-1] / seconds
    return {
        "engine": runner.engine,
        "mode": runner.mode,
        "drafter": runner.drafter,
        # Of the last timed run (same prompts and seeds' distribution as the others).
        "accept_len_mean": spec.get("spec/accept_len_mean"),
        "accept_rate": spec.get("spec/accept_rate"),
        "drafted_per_step": spec.get("spec/drafted_per_step"),
        "draft_ms": spec.get("spec/draft_ms"),
        # Sequences the engine decoded at once (native: its admitted batch; others: --batch).
        "seqs_admitted": stats.get("seqs_admitted_peak", float(args.batch)),
        "tokens_per_s": tokens_per_s,
        "ms_per_step": (
            None if args.stop_at_eos else 1000 * max(seconds - prefill, 0.0) / max(n_new - 1, 1)
        ),
        "prefill_s": prefill,
        "kv_bytes_peak": runner.kv_bytes(),
        "peak_mem_bytes": peak_mem,
        "seconds": seconds,
        "seconds_all": times,
        "tokens": tokens,
        "step_ms": _step_timeline(stats),
    }


def _step_timeline(stats: dict[str, float]) -> dict[str, dict[int, list[float]]] | None:
    """The engine's step timeline (`Engine(time_steps=True)`): kind -> rows -> [steps, mean
    ms]; None without one."""
    out: dict[str, dict[int, list[float]]] = {}
    for key, ms in stats.items():
        if key.startswith("step_ms/"):
            _, kind, rows = key.split("/")
            n = stats[f"step_n/{kind}/{rows}"]
            out.setdefault(kind, {})[int(rows.removeprefix("rows"))] = [n, ms]
    return out or None


def format_step_timeline(rows: list[dict[str, Any]]) -> str:
    """Each row's step timeline in row-count bands (1, 2, 3-4, 5-8, ...): mean ms a step of
    each kind, weighted by steps, and the steps."""
    lines = []
    for r in rows:
        timeline = r.get("step_ms")
        if not timeline:
            continue
        lines.append(f"{r['engine']} {r['mode']}" + (f" {r['drafter']}" if r["drafter"] else ""))
        for kind, by_rows in sorted(timeline.items()):
            bands: dict[int, list[float]] = {}
            for n_rows, (n, ms) in by_rows.items():
                top = 1 << (n_rows - 1).bit_length()  # the band's upper edge
                cell = bands.setdefault(top, [0.0, 0.0])
                cell[0] += n
                cell[1] += n * ms
            cells = [
                f"{top if top <= 2 else f'{top // 2 + 1}-{top}'} rows {tot / n:.2f} ms ({n:.0f})"
                for top, (n, tot) in sorted(bands.items())
            ]
            lines.append(f"  {kind}: " + " | ".join(cells))
    return "\n".join(lines)


def _task_prompts(
    task: str, batch: int, seed: int, model_dir: str, task_args: dict[str, Any]
) -> list[list[int]]:
    """The first `batch` train prompts of a built-in task, in the model's chat template."""
    from rlkit.data.tasks import get_task
    from rlkit.models.tokenizer import apply_chat, load_tokenizer

    tok = load_tokenizer(model_dir)
    try:
        samples = get_task(task).build("train", batch, seed, **task_args)
    except ValueError as e:
        raise SystemExit(f"rlkit bench: {e}") from None
    return [apply_chat(tok, s["prompt"]) for s in samples]


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if key == "kv_bytes_peak":
            value = value / 2**20
        elif key == "peak_mem_bytes":
            value = value / 2**30
        return fmt.format(value)

    cells = [[title for _, title, _ in COLUMNS]] + [
        [cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _csv(text: str, valid: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise SystemExit(f"rlkit bench: unknown {what} {bad or text!r}; valid: {', '.join(valid)}")
    return items


def rollout(argv: Sequence[str]) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(
        prog="rlkit bench rollout", description=__doc__.split("\n")[0] if __doc__ else None
    )
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--group",
        type=int,
        default=1,
        help="samples a prompt, as an RL step's group: --batch / --group prompts, each "
        "--group times (--batch must be a multiple)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", default="dense")
    ap.add_argument("--engines", default="native,hf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="of every engine; auto: bfloat16 where the device computes it natively, else "
        "float32 (rlkit/device.py)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="as the recipe's device: auto takes the GPU when there is one (native and hf "
        "engines; peak memory is then the GPU's peak allocation)",
    )
    sparse = ap.add_argument_group("sparse mode (compressed KV cache)")
    sparse.add_argument(
        "--policy", default="snapkv", choices=["snapkv", "rkv", "h2o", "streaming", "layer_hybrid"]
    )
    sparse.add_argument("--budget", type=int, default=256)
    sparse.add_argument("--window", type=int, default=8)
    sparse.add_argument("--interval", type=int, default=32)
    sparse.add_argument(
        "--compaction",
        default="auto",
        choices=["auto", "fill", "ordered"],
        help="rollout.kv_compression.compaction: how a compression packs the kept entries",
    )
    spec = ap.add_argument_group("spec mode (speculative decoding)")
    spec.add_argument(
        "--drafter", default="sam+mtp", help=f"one row each, of {', '.join(DRAFTER_NAMES)}"
    )
    spec.add_argument("--num-draft-tokens", type=int, default=3)
    spec.add_argument("--sam-min-match", type=int, default=4)
    spec.add_argument(
        "--sam-match",
        default="latest",
        choices=["latest", "first"],
        help="the earlier occurrence of its match SAM continues",
    )
    spec.add_argument(
        "--tail-rows",
        type=int,
        default=0,
        help="draft --tail-draft-tokens instead once at most this many sequences run (0: off)",
    )
    spec.add_argument("--tail-draft-tokens", type=int, default=0)
    spec.add_argument(
        "--draft-chains",
        type=int,
        default=1,
        help="draft chains a row verifies in one step (deterministic drafts, CUDA graphs)",
    )
    spec.add_argument(
        "--tail-draft-chains", type=int, default=0, help="the chains in the tail (0: the same)"
    )
    spec.add_argument(
        "--chain-kinds",
        default="sam,mtp,mtp_runner_up,sam_other",
        help="which chains, in order (a step of C chains takes the first C the drafter makes)",
    )
    spec.add_argument(
        "--adaptive-draft",
        action="store_true",
        help="the draft length follows the acceptance of the last round (halved below 30%%, "
        "doubled above 70%%, up to --num-draft-tokens or the tail's)",
    )
    spec.add_argument(
        "--spec-max-batch",
        type=int,
        default=0,
        help="speculate only while at most this many sequences run (0: always)",
    )
    spec.add_argument(
        "--mtp-vocab",
        type=int,
        default=0,
        help="the MTP draft head's tokens (the most frequent; 0: the whole vocabulary)",
    )
    spec.add_argument(
        "--mtp-draft",
        default="sample",
        choices=["sample", "argmax"],
        help="sampling runs: the MTP module's drafts drawn from its distribution, or its argmax",
    )
    spec.add_argument(
        "--mtp",
        default=None,
        help="a model directory whose mtp.safetensors drafts (default: "
        "--model's, else an untrained module)",
    )
    ap.add_argument(
        "--task",
        default=None,
        help="prompts: this built-in task's train prompts in the chat "
        "template (mixed lengths; native and vllm engines), instead of random tokens",
    )
    ap.add_argument(
        "--task-args",
        default="{}",
        help='the task\'s arguments as JSON, e.g. \'{"digits": 2, "ops": ["*"], "steps": true}\'',
    )
    vllm = ap.add_argument_group("vllm engine")
    vllm.add_argument("--vllm-python", default=None, help="interpreter of the vLLM env")
    vllm.add_argument("--vllm-kv-gb", type=float, default=2.0, help="vLLM CPU KV cache GiB")
    ap.add_argument(
        "--kv-memory-gb",
        type=float,
        default=None,
        help="native engines: size the batch by this many GiB of KV cache (at most --batch; "
        "a compressed cache admits more); the seqs column says how many each row admitted",
    )
    ap.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="each sequence ends at its EOS (as in an RL rollout) instead of running to "
        "--max-new-tokens; native and vllm engines",
    )
    ap.add_argument(
        "--step-times",
        action="store_true",
        help="native engines: a step timeline (the device synchronised around each decode "
        "step): each row's mean ms a step by kind and running sequences, of its last timed "
        "run (`step_ms` in --json)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time repeat i of every row before repeat i + 1 of any (all engines loaded at "
        "once), so that the machine's drift falls on every row alike; no peak-memory column",
    )
    ap.add_argument("--json", default=None, help="write the rows to this file as JSON")
    args = ap.parse_args(list(argv))
    args.device, where = local_device(args.device)
    print(f"rlkit bench: {args.device} ({where})", file=sys.stderr)
    choice = pick_dtype(args.dtype, args.device)
    args.dtype = choice.name
    print(f"rlkit bench: {choice.name} ({choice.why})", file=sys.stderr)
    modes = _csv(args.modes, MODES, "mode")
    engines = _csv(args.engines, ENGINES, "engine")
    if "spec" in modes:
        drafters = _csv(args.drafter, DRAFTER_NAMES, "drafter")
        modes = [m for m in modes if m != "spec"] + [f"spec:{d}" for d in drafters]
        from rlkit.config.schema import SpeculativeConfig

        for d in drafters:
            cfg = SpeculativeConfig(
                drafter=d, num_draft_tokens=args.num_draft_tokens,  # type: ignore[arg-type]
                tail_rows=args.tail_rows, tail_draft_tokens=args.tail_draft_tokens,
                draft_chains=args.draft_chains, tail_draft_chains=args.tail_draft_chains,
                mtp_draft=args.mtp_draft, chain_kinds=args.chain_kinds.split(","),
            )  # fmt: skip
            tail = cfg.tail_problem() or cfg.chains_problem()
            if tail is not None:
                raise SystemExit(f"rlkit bench: --{tail[0].replace('_', '-')} {tail[1]}")
        if args.mtp_draft != "sample" and not any("mtp" in d for d in drafters):
            raise SystemExit(
                f"rlkit bench: --mtp-draft {args.mtp_draft} needs an MTP drafter (--drafter "
                f"mtp or sam+mtp), got {args.drafter}"
            )
        chains = max(args.draft_chains, args.tail_draft_chains)
        # (args.device is resolved above: `local_device`.)
        if chains > 1 and (not args.device.startswith("cuda") or set(engines) != {"native"}):
            raise SystemExit(
                f"rlkit bench: --draft-chains / --tail-draft-chains ({chains}) run on the native "
                "engine's CUDA-graph verify step: a GPU (--device cuda) and --engines native, "
                f"got --device {args.device}, --engines {args.engines}"
            )
    if args.stop_at_eos and "hf" in engines:
        raise SystemExit(
            "rlkit bench: --stop-at-eos: the hf engine always runs to the cap; drop it"
        )
    if args.task and "hf" in engines:
        raise SystemExit("rlkit bench: --task prompts have mixed lengths; drop the hf engine")
    if args.group < 1 or args.batch % args.group:
        raise SystemExit(
            f"rlkit bench: --group {args.group} must be >= 1 and divide --batch {args.batch}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    vocab = _model_args(model_dir).vocab_size
    if args.task:
        try:
            task_args = json.loads(args.task_args)
        except json.JSONDecodeError as e:
            raise SystemExit(f"rlkit bench: --task-args is not JSON: {e}") from None
        prompts = _task_prompts(
            args.task, args.batch // args.group, args.seed, model_dir, task_args
        )
    else:
        g = torch.Generator().manual_seed(args.seed)
        # Ordinary token ids (the low ids are special in most vocabularies), one length for all.
        low = min(1000, vocab // 2)
        prompts = torch.randint(
            low, vocab, (args.batch // args.group, args.prompt_len), generator=g
        ).tolist()
    prompts = [p for p in prompts for _ in range(args.group)]  # each prompt's group together

    plan = [(e, m) for e in _MODAL if e in engines for m in modes]
    plan += [(e, "dense") for e in engines if e not in _MODAL]
    skipped = [f"{e}/{m}" for e in engines if e not in _MODAL for m in modes if m != "dense"]
    if skipped:
        print(f"rlkit bench: {', '.join(skipped)} skipped (only the native engine has modes)")
    rows = _measure_plan(plan, args, model_dir, prompts)
    base = next((r for r in rows if r["engine"] == "native" and r["mode"] == "dense"), None)
    for r in rows:
        r["ratio_vs_native_dense"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "batch",
            "prompt_len",
            "group",
            "max_new_tokens",
            "dtype",
            "temperature",
            "top_p",
            "top_k",
            "stop_at_eos",
            "task",
            "task_args",
            "kv_memory_gb",
            "interleave",
        )
    }
    settings["threads"] = torch.get_num_threads()
    settings["cpu"] = cpu_summary()
    settings["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if "sparse" in modes:
        settings.update(
            policy=args.policy, budget=args.budget, window=args.window, interval=args.interval,
            compaction=args.compaction,
        )  # fmt: skip
    if any(m.startswith("spec:") for m in modes):
        from rlkit.models.mtp import MTP_FILE

        has = os.path.isfile(os.path.join(args.mtp or model_dir, MTP_FILE))
        settings.update(
            num_draft_tokens=args.num_draft_tokens,
            sam_min_match=args.sam_min_match,
            sam_match=args.sam_match,
            mtp_vocab=args.mtp_vocab,
            mtp_draft=args.mtp_draft,
            spec_max_batch=args.spec_max_batch,
            tail_rows=args.tail_rows,
            tail_draft_tokens=args.tail_draft_tokens,
            draft_chains=args.draft_chains,
            tail_draft_chains=args.tail_draft_chains,
            chain_kinds=args.chain_kinds,
            adaptive_draft=args.adaptive_draft,
            mtp=(args.mtp or model_dir) if has else "untrained (no mtp.safetensors)",
        )
    print(", ".join(f"{k}={v}" for k, v in settings.items()))
    print(format_table(rows))
    if args.step_times:
        print(format_step_timeline(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{**r, "settings": settings} for r in rows], f, indent=1)
        print(f"rlkit bench: rows written to {args.json}")
    return rows


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("rollout",):
        print("usage: rlkit bench rollout [options]   (rlkit bench rollout --help)")
        return 2
    rollout(argv[1:])
    return 0
