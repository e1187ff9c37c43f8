"""Dense rollout engine: batched prefill and decode over a static KV cache.

`Engine.generate` runs n samples for each prompt. Every distinct prompt is prefilled once and
its keys/values written straight into the slots of its n samples. Decoding steps all running
sequences at once; every `sync_every` steps (and whenever a sequence reaches its token limit)
the host reads the new tokens, finishes sequences (EOS, stop ids, stop strings, length),
compacts the survivors into slots 0..B-1 and admits waiting sequences into the freed slots.

With `kv_compression` (Sparse-RL), the cache is a `CompressedKVCache`: prompts longer than the
budget are compressed as they are prefilled, and every `interval` decode steps of a sequence
its slot is compressed again if it holds more than the budget; the sampler's log-probs are those of this sparse policy.
`Engine.stats` describes the last `generate` call (KV bytes allocated and retained).
"""

from __future__ import annotations

import ctypes
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlkit.config.schema import KVCompressionConfig
from rlkit.device import DTYPE_NAMES
from rlkit.kernels import cpu as cpu_kernels
from rlkit.models.decoder import PACK_LAYOUTS, Decoder, can_pack, default_pack_layout
from rlkit.models.loading import load_weights
from rlkit.models.tokenizer import eos_token_ids
from rlkit.rollout.compression import validate
from rlkit.rollout.cuda_graphs import DecodeGraphs, supported
from rlkit.rollout.kv_cache import CompressedKVCache, KVCache
from rlkit.rollout.sampling import SamplingParams, make_generator, sample
from rlkit.rollout.stopping import StopChecker

# Rows of the LM head and sampler per chunk: keeps every [rows, V] temporary under glibc's
# mmap threshold (see _reuse_freed_memory) and in cache.
_SAMPLE_ROWS = 64
# GEMM rows that prepacked weights are laid out for (decode batches are up to max_batch_size).
_PACK_BATCH_HINT = 64


def _reuse_freed_memory() -> None:
    """Have glibc keep freed blocks up to 32 MB for reuse instead of unmapping them.

    Every decode step allocates the same few-MB temporaries (logits rows, float32/float64
    copies for the sampler); served by fresh mmaps, each one page-faults afresh, which in a VM
    costs about as much as the arithmetic. Process-wide, harmless elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def _pack_layout(
    prepack: bool | str | None, device: torch.device, dtype: torch.dtype
) -> str | None:
    """The packed-weight layout `Engine(prepack=...)` asks for (None: plain weights)."""
    if prepack is None or prepack is False:
        return None if prepack is False else default_pack_layout(device, dtype)
    layout = default_pack_layout(device, dtype) if prepack is True else prepack
    if layout is None or layout not in PACK_LAYOUTS or not can_pack(layout, device, dtype):
        raise ValueError(
            f"prepack={prepack!r}: no packed weights of that layout ({', '.join(PACK_LAYOUTS)})"
            f" run for {dtype} on {device}"
        )
    return layout


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    # Log-probability of each token under the sampling distribution (float32 math).
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    text: str


class Engine:
    """Generation with `model`, which the engine takes over: it is cast in place to `dtype`,
    put in eval mode with gradients off, and its q/k/v and gate/up projections are fused
    (`Decoder.fuse_projections`), so give the engine its own copy, not the learner's.

    max_batch_size: sequences decoded at once; the rest wait for a free slot.
    max_seq_len: prompt + completion cap (default: the model's max positions). The cache is
    sized per call to min(max_seq_len, longest prompt + max_new_tokens) and kept for reuse.
    sync_every: decode steps between host checks of finished sequences.
    max_prefill_tokens: padded prompt tokens per prefill forward.
    kv_compression: Sparse-RL's compressed KV (None or policy "none": dense). The compressed
    layers' cache then holds budget + interval entries per slot, not the whole sequence.
    prepack: linear weights packed once for the CPU's GEMM (`Decoder.prepack_weights`), no
    second copy of the weights: a layout of `PACK_LAYOUTS` ("avx2": the float32 GEMM of the
    AVX2 C kernels, outputs equal up to float32 summation order; "onednn": oneDNN's own
    layout, identical outputs), True or None for `default_pack_layout` (None: none where
    there is none), False for plain weights.
    cpu_kernels: decode steps through the C kernels on CPU (bf16, where they are built:
    `rlkit.kernels.cpu`; `Decoder.forward_decode_fused`); False runs PyTorch ops (ATen's
    SDPA for attention), to compare.
    cuda_graphs: decode steps replayed from CUDA graphs, one per padded batch size
    (`rollout/cuda_graphs.py`; default: on for CUDA; not under the h2o policy). True on a CPU
    runs the same padded steps without capturing them (the path tested there).

    `stats` (after each `generate`): kv_bytes_peak (bytes of the cache's K/V storage as
    allocated), kv_bytes_retained_per_seq (mean over sequences of the entries held when the
    sequence finished, summed over layers, times bytes per entry), kv_bytes_dense_per_seq
    (what a dense cache holds at that moment: prompt + fed completion tokens, i.e. all but the
    last sampled token, times bytes per token), kv_retained_frac (their ratio),
    kv_retained_frac_max (the largest per-sequence ratio),
    compression_events ((sequence, layer) compressions in the call).
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Any,
        max_batch_size: int = 256,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        sync_every: int = 4,
        max_prefill_tokens: int = 8192,
        kv_compression: KVCompressionConfig | None = None,
        prepack: bool | str | None = None,
        cpu_kernels: bool = True,
        cuda_graphs: bool | None = None,
    ):
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.model.fuse_projections()
        self.device = next(model.parameters()).device
        layout = _pack_layout(prepack, self.device, dtype)
        if layout is not None:
            self.model.prepack_weights(min(max_batch_size, _PACK_BATCH_HINT), layout)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.args.max_position_embeddings
        self.sync_every = sync_every
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_token_ids(tokenizer, model.args)
        self.cache: KVCache | None = None
        self.cpu_kernels = cpu_kernels
        # One-token decode steps through the C kernels (bf16 on CPU where they are built).
        self.fused_decode = cpu_kernels and self.model.can_fuse_decode()
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and not self.fused_decode
        self._graphs: DecodeGraphs | None = None
        self.compression = kv_compression
        if kv_compression is not None and kv_compression.policy == "none":
            self.compression = None
        if self.compression is not None:
            validate(self.compression)
        self.stats: dict[str, float] = {}
        if self.device.type == "cpu":
            _reuse_freed_memory()

    def describe(self) -> str:
        """How this engine computes, for start-up logs: dtype, weights, decode step."""
        parts = [DTYPE_NAMES.get(self.dtype, str(self.dtype)), self.device.type]
        if self.model.pack_layout == "avx2":
            parts.append("weights packed for the AVX2 GEMM")
        elif self.model.pack_layout == "onednn":
            parts.append("oneDNN-prepacked weights")
        if self.fused_decode:
            parts.append(f"decode step on {cpu_kernels.describe()}")
        elif self.device.type == "cpu":
            why = cpu_kernels.unavailable_reason(self.dtype) if self.cpu_kernels else "turned off"
            parts.append(f"decode step on PyTorch ops (C kernels: {why})")
        elif self.cuda_graphs:
            parts.append("CUDA-graph decode steps")
        return ", ".join(parts)

    def release_cache(self) -> None:
        """Free the KV cache between calls (the next `generate` allocates a fresh one).

        The RL loop calls this after each rollout: the cache (hundreds of MB at RL batch
        sizes) would otherwise sit idle through the learner's step, the run's memory peak.
        """
        self.cache = None
        self._graphs = None  # their memory pool and their views of the cache

    def _decode_graphs(self, cache: KVCache) -> DecodeGraphs | None:
        """The replayable decode steps for `cache` (None: eager steps)."""
        if not self.cuda_graphs or not supported(cache):
            return None
        if self._graphs is None or self._graphs.cache is not cache:
            self._graphs = DecodeGraphs(self.model, cache, capture=cache.device.type == "cuda")
        return self._graphs

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy new weights (any dtype, e.g. the learner's float32) into the engine's model."""
        load_weights(self.model, state_dict)

    def _cache_for(
        self, slots: int, length: int, compression: KVCompressionConfig | None
    ) -> KVCache:
        a, c = self.model.args, compression
        if c is not None:
            # A row holds at most `budget` entries after prefill or a compression, and gains
            # at most `interval` before the next one.
            small = min(length, c.budget + c.interval)
            old = self.cache
            if not (
                isinstance(old, CompressedKVCache)
                and old.fits_compressed(slots, small, length, self.dtype, c)
            ):
                self.cache = old = None  # free the old one before allocating
                self._graphs = None
                self.cache = CompressedKVCache(
                    a.num_layers, slots, small, length, a.num_heads, a.num_kv_heads,
                    a.head_dim, c, self.dtype, self.device, self.cpu_kernels,
                )  # fmt: skip
            assert self.cache is not None
            return self.cache
        if (
            self.cache is None
            or isinstance(self.cache, CompressedKVCache)
            or not self.cache.fits(slots, length, self.dtype)
        ):
            self.cache = None  # free the old one before allocating
            self._graphs = None
            self.cache = KVCache(
                a.num_layers, slots, length, a.num_kv_heads, a.head_dim, self.dtype, self.device,
                self.cpu_kernels,
            )  # fmt: skip
        return self.cache

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1, compress: bool = True
    ) -> list[Completion]:
        """n completions per prompt, prompt-major: result[i * n + j] is sample j of prompt i.

        compress=False decodes this call against a dense cache even when the engine has
        `kv_compression` (a Sparse-RL run's held-out evaluation of the model as deployed).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_seq_len:
            raise ValueError(f"a prompt has {longest} tokens; max_seq_len is {self.max_seq_len}")
        run = _Run(self, prompts, params, n, self.compression if compress else None)
        return run.execute()


class _Run:
    """State of one `generate` call. Per-slot arrays cover slots 0..B-1 (the running batch)."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        compression: KVCompressionConfig | None,
    ):
        self.e, self.prompts, self.params, self.n = engine, prompts, params, n
        self.model = engine.model
        dev = engine.device
        total = len(prompts) * n
        length = min(engine.max_seq_len, max(len(p) for p in prompts) + params.max_new_tokens)
        self.cache = engine._cache_for(min(engine.max_batch_size, total), length, compression)
        self.slots = self.cache.num_slots
        self.graphs = engine._decode_graphs(self.cache)
        self.gen = make_generator(params, dev)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_ids)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        self.checker = StopChecker(engine.tokenizer, params.stop)
        # Outputs indexed by sequence id (prompt i, sample j -> i * n + j): compaction never
        # moves them.
        self.out_tokens = torch.zeros(total, params.max_new_tokens, dtype=torch.long, device=dev)
        self.out_logprobs = torch.zeros(
            total, params.max_new_tokens, dtype=torch.float32, device=dev
        )
        # Device state of the running slots.
        self.last = torch.zeros(self.slots, dtype=torch.long, device=dev)  # token to feed next
        self.done = torch.zeros(self.slots, dtype=torch.bool, device=dev)  # stop id sampled
        self.seq_dev = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self.count_dev = torch.zeros(self.slots, dtype=torch.long, device=dev)
        # Host mirror: sequence id, tokens generated, token limit, per running slot.
        self.seq: list[int] = []
        self.count = np.zeros(0, dtype=np.int64)
        self.limit = np.zeros(0, dtype=np.int64)
        self.waiting = deque(range(total))
        self.results: list[Completion | None] = [None] * total
        # Compression; per sequence the entries held at its finish and its true length then.
        self.compression = compression
        self.events0 = getattr(self.cache, "events", 0)
        self.held = np.zeros(total, dtype=np.int64)
        self.true_len = np.zeros(total, dtype=np.int64)

    def execute(self) -> list[Completion]:
        while self.waiting or self.seq:
            self._admit()
            steps = min(self.e.sync_every, int((self.limit - self.count).min()))
            for _ in range(steps):
                self._decode_step()
            self._retire()
        self._record_stats()
        return [r for r in self.results if r is not None]

    def _record_stats(self) -> None:
        c = self.cache
        dense = float(self.true_len.mean()) * c.bytes_per_token
        retained = float(self.held.mean()) * c.bytes_per_entry
        self.e.stats = {
            "kv_bytes_peak": float(c.allocated_bytes),
            "kv_bytes_retained_per_seq": retained,
            "kv_bytes_dense_per_seq": dense,
            "kv_retained_frac": retained / dense if dense else 1.0,
            # The least-compressed sequence: 1 - this is what every sequence lost at least.
            "kv_retained_frac_max": float(
                (
                    self.held * c.bytes_per_entry / np.maximum(self.true_len * c.bytes_per_token, 1)
                ).max()
            )
            if len(self.held)
            else 1.0,
            "compression_events": float(getattr(c, "events", 0) - self.events0),
        }

    def _admit(self) -> None:
        """Prefill waiting sequences into free slots, one forward per distinct prompt."""
        free = self.slots - len(self.seq)
        if not self.waiting or free == 0:
            return
        new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        prompt_ids = sorted({s // self.n for s in new})
        # Chunks of prompts within the padded-token budget.
        chunk: list[int] = []
        for p in prompt_ids:
            width = max([len(self.prompts[q]) for q in chunk] + [len(self.prompts[p])])
            if chunk and width * (len(chunk) + 1) > self.e.max_prefill_tokens:
                self._prefill(chunk, [s for s in new if s // self.n in chunk])
                chunk = []
            chunk.append(p)
        self._prefill(chunk, [s for s in new if s // self.n in chunk])

    def _prefill(self, prompt_ids: list[int], seqs: list[int]) -> None:
        dev = self.e.device
        lengths = [len(self.prompts[p]) for p in prompt_ids]
        tokens = torch.zeros(len(prompt_ids), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            tokens[i, : lengths[i]] = torch.tensor(self.prompts[p])
        tokens = tokens.to(dev)
        row_of = {p: i for i, p in enumerate(prompt_ids)}
        first = len(self.seq)
        slots = torch.arange(first, first + len(seqs))
        rows = torch.tensor([row_of[s // self.n] for s in seqs])
        self.cache.begin_prefill(slots, rows, lengths)
        positions = torch.arange(tokens.shape[1], device=dev).expand_as(tokens)
        hidden = self.model.forward_cached(tokens, positions, self.cache)  # [P, T, hidden]
        last = hidden[torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev) - 1]
        # The LM head sees one row per sequence, never the prompt's other positions.
        tok, logp = self._sample(last[rows.to(dev)])  # [m]
        seq_t = torch.tensor(seqs, device=dev)
        self.out_tokens[seq_t, 0] = tok
        self.out_logprobs[seq_t, 0] = logp
        end = first + len(seqs)
        self.last[first:end] = tok
        self.done[first:end] = torch.isin(tok, self.stop_ids)
        self.seq_dev[first:end] = seq_t
        self.count_dev[first:end] = 1
        self.seq.extend(seqs)
        prompt_len = np.array([len(self.prompts[s // self.n]) for s in seqs], dtype=np.int64)
        limit = np.minimum(self.params.max_new_tokens, self.cache.capacity - prompt_len)
        self.count = np.concatenate([self.count, np.ones(len(seqs), dtype=np.int64)])
        self.limit = np.concatenate([self.limit, limit])
        for s in seqs:
            self.checker.reset(s)

    def _decode_step(self) -> None:
        B = len(self.seq)
        if self.graphs is not None:
            hidden = self.graphs.step(B, self.last)
        else:
            positions = self.cache.begin_decode(B)  # [B, 1]
            if self.e.fused_decode:
                hidden = self.model.forward_decode_fused(self.last[:B, None], positions, self.cache)
            else:
                hidden = self.model.forward_cached(self.last[:B, None], positions, self.cache)
        tok, logp = self._sample(hidden[:, -1])
        seq, count = self.seq_dev[:B], self.count_dev[:B]
        self.out_tokens[seq, count] = tok
        self.out_logprobs[seq, count] = logp
        self.done[:B] |= torch.isin(tok, self.stop_ids)
        self.last[:B] = tok
        self.count_dev[:B] += 1
        self.count += 1
        if self.compression is not None:
            # Each sequence is checked every `interval` of its own decode steps, so what it
            # keeps does not depend on when it was admitted next to others.
            due = np.nonzero((self.count - 1) % self.compression.interval == 0)[0]
            if len(due):
                assert isinstance(self.cache, CompressedKVCache)
                self.cache.compress(due)

    def _sample(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [N] and sampler log-probs [N] from final hidden states [N, hidden]."""
        outs = [
            sample(self.model.logits(hidden[i : i + _SAMPLE_ROWS]), self.params, self.gen)
            for i in range(0, hidden.shape[0], _SAMPLE_ROWS)
        ]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([t for t, _ in outs]), torch.cat([lp for _, lp in outs])

    def _retire(self) -> None:
        """Finish sequences that stopped or hit their limit; compact; free their slots."""
        B = len(self.seq)
        done = self.done[:B].tolist()
        finished: list[int] = []
        for b in range(B):
            s, count = self.seq[b], int(self.count[b])
            stop_at = None
            if done[b] or self.checker.active:
                stop_at = self._stop_index(s, self.out_tokens[s, :count], done[b])
            if stop_at is not None:
                self._finish(s, stop_at, "stop")
            elif count >= self.limit[b]:
                self._finish(s, count, "length")
            else:
                continue
            self.held[s] = self.cache.entries_held(b)
            self.true_len[s] = self.cache.positions[b]
            finished.append(b)
        if finished:
            self._compact(finished)

    def _stop_index(self, s: int, row: torch.Tensor, has_stop_id: bool) -> int | None:
        """Tokens to keep if sequence s has stopped (through its stop token or stop string)."""
        cut = None
        if has_stop_id:
            # First stop id; tokens sampled after it (before this sync) are dropped.
            cut = int(torch.isin(row, self.stop_ids).nonzero()[0, 0]) + 1
            row = row[:cut]
        text_cut = self.checker.check(s, row)
        return text_cut if text_cut is not None else cut

    def _finish(self, s: int, keep: int, reason: str) -> None:
        tokens = self.out_tokens[s, :keep].tolist()
        text = self.e.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":
            text = self.checker.truncate(text)
        self.results[s] = Completion(
            s // self.n, tokens, self.out_logprobs[s, :keep].tolist(), reason, text
        )

    def _compact(self, finished: list[int]) -> None:
        B = len(self.seq)
        keep_n = B - len(finished)
        holes = [b for b in finished if b < keep_n]
        gone = set(finished)
        movers = [b for b in range(keep_n, B) if b not in gone]
        self.cache.move(movers, holes)
        if holes:
            src = torch.tensor(movers, device=self.e.device)
            dst = torch.tensor(holes, device=self.e.device)
            for t in (self.last, self.done, self.seq_dev, self.count_dev):
                t[dst] = t[src]
        for m, h in zip(movers, holes, strict=True):
            self.seq[h], self.count[h], self.limit[h] = self.seq[m], self.count[m], self.limit[m]
        del self.seq[keep_n:]
        self.count, self.limit = self.count[:keep_n], self.limit[:keep_n]
