"""Rollout engine: batched prefill and decode over a static KV cache, in three modes of one
engine: dense, sparse (a compressed KV cache) and speculative (drafts verified by the policy).

`Engine.generate` runs n samples for each prompt (`scheduler.Run`: admission, prefill,
retirement, compaction). Every distinct prompt is prefilled once and its keys/values written
straight into the slots of its n samples. Decode steps (`steps.py`) advance all running
sequences at once, one token each (`PlainStep`) or a verified run of drafts each (`SpecStep`
with a drafter from `drafters.py`); every `sync_every` steps (when a sequence can stop
early) and whenever a sequence reaches its token limit, the host finishes sequences (EOS,
stop ids, stop strings, length), compacts the survivors into slots 0..B-1 and admits waiting
sequences into the freed slots.

With `kv_compression` (Sparse-RL), the cache is a `CompressedKVCache`: prompts longer than the
budget are compressed as they are prefilled, and every `interval` tokens of a sequence its
slot is compressed again if it holds more than the budget (the cache's own trigger); the
sampler's log-probs are those of this sparse policy. With `speculative`, the emitted tokens
follow the same distribution as plain decoding's (lossless), and the log-probs are the
policy's. `Engine.stats` describes the last `generate` call (KV bytes; speculative figures).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import psutil
import torch

from rlkit.config.schema import KVCompressionConfig, SpeculativeConfig
from rlkit.device import DTYPE_NAMES, use_attention_backends
from rlkit.kernels import cpu as cpu_kernels
from rlkit.models.decoder import PACK_LAYOUTS, Decoder, can_pack, default_pack_layout
from rlkit.models.loading import load_weights
from rlkit.models.mtp import PREFIX as MTP_PREFIX
from rlkit.models.mtp import MTPModule, load_mtp_state
from rlkit.models.tokenizer import eos_token_ids
from rlkit.rollout.compression import validate
from rlkit.rollout.cuda_graphs import DecodeGraphs
from rlkit.rollout.drafters import DRAFTERS, DraftSettings
from rlkit.rollout.kv_cache import CompressedKVCache, KVCache, cache_fills
from rlkit.rollout.sam import SuffixAutomaton, corpus_automaton
from rlkit.rollout.sampling import SamplingParams
from rlkit.rollout.scheduler import Completion, DecodeStep, Run
from rlkit.rollout.steps import DraftLength, PlainStep, SpecStep, SyncFreeSpecStep

__all__ = ["Completion", "Engine"]

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


class Engine:
    """Generation with `model`, which the engine takes over: it is cast in place to `dtype`,
    put in eval mode with gradients off, and its q/k/v and gate/up projections are fused
    (`Decoder.fuse_projections`), so give the engine its own copy, not the learner's.

    max_batch_size: sequences decoded at once; the rest wait for a free slot.
    kv_memory_gb / kv_memory_fraction: size the batch by KV memory instead (at most
    max_batch_size): as many sequences as that many GiB, or that fraction of the device's free
    memory, hold at the cache's bytes per sequence (`slot_bytes`: a dense sequence its whole
    length, a compressed one budget + interval entries per compressed layer), so a compressed
    cache admits proportionally more. Checked per `generate` call (`admitted`). It counts the
    policy's cache; an MTP drafter's one-layer dense cache comes on top.
    max_seq_len: prompt + completion cap (default: the model's max positions). The cache is
    sized per call to min(max_seq_len, longest prompt + max_new_tokens) and kept for reuse.
    sync_every: decode steps between retires (the host's reads of finished sequences) when
    a sequence can stop before its limit (EOS, stop ids, stop strings); a retire also runs at
    every sequence's token limit, and only there when nothing can stop a sequence earlier.
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
    (`rollout/cuda_graphs.py`; default: on for CUDA, for every compression policy: H2O's
    accumulated attention is updated inside the captured step, and compressions run between
    steps on the Triton kernels of `rlkit.kernels.kv_compress`, without a host sync). True on a CPU
    runs the same padded steps without capturing them (the path tested there).
    speculative: draft-and-verify decoding (None or drafter "none": plain steps). mtp: the
    MTP module the `mtp` and `sam+mtp` drafters use; the engine casts it to `dtype` and takes
    its weights from `load_state_dict` (names `mtp.*`) with the policy's.

    `stats` (after each `generate`): kv_bytes_peak (bytes of the cache's K/V storage as
    allocated), kv_bytes_retained_per_seq (mean over sequences of the entries held when the
    sequence finished, summed over layers, times bytes per entry), kv_bytes_dense_per_seq
    (what a dense cache holds at that moment: prompt + fed completion tokens, i.e. all but the
    last sampled token, times bytes per token), kv_retained_frac (their ratio),
    kv_retained_frac_max (the largest per-sequence ratio),
    compression_events ((sequence, layer) compressions in the call), seqs_admitted_peak (the
    sequences the call could decode at once: its cache's slots in use, `admitted`),
    concurrent_seqs_max (the most that did run at once); speculative calls add
    spec/accept_len_mean, spec/accept_rate, spec/drafted_per_step, spec/draft_ms,
    spec/verify_steps (`steps.SpecStep.stats`); time_total_s, time_admit_s, time_decode_s,
    time_retire_s (the call's wall seconds and their split: admission with its prefills,
    decode stretches each ending in the host's read of the device, retires) and decode_rounds
    (admit / decode / retire rounds).
    time_steps: a diagnostic step timeline. The device is synchronised around every decode step
    (on a GPU that costs the host its run-ahead), and `stats` gains step_ms/KIND/rowsR (mean
    milliseconds of a step of that kind, `DecodeStep.kind`, at R running sequences, with its
    compression check) and step_n/KIND/rowsR (how many).
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
        speculative: SpeculativeConfig | None = None,
        mtp: MTPModule | None = None,
        kv_memory_gb: float | None = None,
        kv_memory_fraction: float | None = None,
        time_steps: bool = False,
    ):
        if kv_memory_gb is not None and kv_memory_fraction is not None:
            raise ValueError("give kv_memory_gb or kv_memory_fraction, not both")
        if kv_memory_gb is not None and not kv_memory_gb > 0:
            raise ValueError(f"kv_memory_gb must be > 0, got {kv_memory_gb}")
        if kv_memory_fraction is not None and not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        self.kv_memory_gb, self.kv_memory_fraction = kv_memory_gb, kv_memory_fraction
        self.time_steps = time_steps
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.model.fuse_projections()
        self.device = next(model.parameters()).device
        # Prefill, verify steps and the MTP drafter's block attend over shapes that change
        # every call: on CUDA no cuDNN attention, which plans each new shape (~7 ms of host
        # time a call on an H200; half of the eager draft steps' time).
        use_attention_backends(self.device)
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
        # Decode steps (one token or a verify step's k + 1 per row) through the C kernels.
        self.fused_decode = cpu_kernels and self.model.can_fuse_decode()
        # Prefills too, where the layers run in one C call (float32 weights packed for the
        # AVX2 GEMM: `Decoder.forward_decode_fused`).
        self.fused_prefill = self.fused_decode and self.model.pack_layout == "avx2"
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and not self.fused_decode
        self._graphs: DecodeGraphs | None = None
        self.compression = kv_compression
        if kv_compression is not None and kv_compression.policy == "none":
            self.compression = None
        if self.compression is not None:
            validate(self.compression)
        self.speculative = speculative
        if speculative is not None and speculative.drafter == "none":
            self.speculative = None
        if self.speculative is not None:
            if self.speculative.num_draft_tokens < 1:
                raise ValueError("speculative.num_draft_tokens must be >= 1")
            if self.speculative.max_batch < 0:
                raise ValueError("speculative.max_batch must be >= 0 (0: always speculate)")
            tail = self.speculative.tail_problem() or self.speculative.chains_problem()
            if tail is not None:
                raise ValueError(f"speculative.{tail[0]} {tail[1]}")
            if self.compression is not None and self.compression.policy == "h2o":
                raise ValueError(
                    "speculative decoding does not combine with the h2o policy: its accumulated "
                    "attention would count the queries of rejected drafts"
                )
            if self.speculative.max_chains > 1 and not self.cuda_graphs:
                raise ValueError(
                    f"speculative.draft_chains ({self.speculative.max_chains}) needs the verify "
                    "step that never syncs, on CUDA graphs: a CUDA device (or cuda_graphs=True "
                    "off the fused CPU step, which runs the same steps eagerly)"
                )
        self.mtp = None
        if mtp is not None:
            self.mtp = mtp.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
            # One GEMM for q/k/v and one for gate/up, as the trunk's (weights stay loadable).
            self.mtp.block.self_attn.fuse()
            self.mtp.block.mlp.fuse()
        if self.speculative is not None and "mtp" in self.speculative.drafter and mtp is None:
            raise ValueError(f"drafter {self.speculative.drafter!r} needs an MTP module (mtp=...)")
        self.static_corpus: SuffixAutomaton | None = None
        # How often each token was in a prompt or an output (the MTP drafter's sub-vocabulary).
        self.token_counts: torch.Tensor | None = None
        if self.speculative is not None and self.speculative.mtp_vocab > 0:
            self.token_counts = torch.zeros(model.args.vocab_size, device=self.device)
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
        if self.speculative is not None:
            sp = self.speculative
            parts.append(f"speculative: {sp.drafter} drafts {sp.num_draft_tokens} tokens")
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
        if not self.cuda_graphs:
            return None
        if self._graphs is None or self._graphs.cache is not cache:
            self._graphs = DecodeGraphs(self.model, cache, capture=cache.device.type == "cuda")
        return self._graphs

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy new weights (any dtype, e.g. the learner's float32) into the engine's model;
        `mtp.*` entries go to the MTP module. A state dict of `mtp.*` entries alone updates
        only the MTP module (the MTP warm-up's sync)."""
        mtp = {k: v for k, v in state_dict.items() if k.startswith(MTP_PREFIX)}
        if mtp:
            if self.mtp is None:
                raise ValueError("weights for an MTP module, but this engine has none")
            load_mtp_state(self.mtp, mtp)
        if len(mtp) < len(state_dict):
            load_weights(self.model, {k: v for k, v in state_dict.items() if k not in mtp})

    def set_static_corpus(self, texts: list[list[int]]) -> None:
        """SAM drafters also match these token lists (e.g. the train split's reference
        answers), each ended by EOS."""
        sep = min(self.eos_ids) if self.eos_ids else 0
        self.static_corpus = corpus_automaton(texts, sep) if texts else None

    def slot_bytes(
        self, length: int, compression: KVCompressionConfig | None, lookahead: int = 0
    ) -> int:
        """Bytes one sequence of up to `length` tokens takes in the cache `generate` builds:
        dense, its whole length; compressed, what the policy's rows hold at most (budget +
        interval entries in the compressed layers) plus its statistics."""
        a, c = self.model.args, compression
        if c is None:
            return KVCache.slot_bytes(
                a.num_layers, length, a.num_kv_heads, a.head_dim, self.dtype, lookahead
            )
        return CompressedKVCache.compressed_slot_bytes(
            a.num_layers, min(length, c.budget + c.interval), length, a.num_heads,
            a.num_kv_heads, a.head_dim, c, self.dtype, lookahead,
            fills=cache_fills(c, self.device),
        )  # fmt: skip

    def kv_memory_bytes(self) -> int | None:
        """The KV cache's byte budget (None: the batch is max_batch_size): kv_memory_gb GiB,
        or kv_memory_fraction of the device's free memory (CUDA: `mem_get_info`; CPU: the
        available RAM) counting the engine's current cache as free (it is reused or
        replaced)."""
        if self.kv_memory_gb is not None:
            return int(round(self.kv_memory_gb * 2**30))
        if self.kv_memory_fraction is None:
            return None
        held = self.cache.held_bytes if self.cache is not None else 0
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return int(self.kv_memory_fraction * (free + held))

    def admitted(
        self, sequences: int, length: int, compression: KVCompressionConfig | None, lookahead: int
    ) -> int:
        """Sequences decoded at once for a call of `sequences` sequences of up to `length`
        tokens: max_batch_size, or under a KV memory budget as many as it holds (at most
        max_batch_size), so a compressed cache admits proportionally more."""
        cap = min(self.max_batch_size, sequences)
        budget = self.kv_memory_bytes()
        if budget is None:
            return cap
        per = self.slot_bytes(length, compression, lookahead)
        if budget < per:
            key = "kv_memory_gb" if self.kv_memory_gb is not None else "kv_memory_fraction"
            raise ValueError(
                f"the KV memory budget ({key}: {budget / 2**20:.1f} MiB) holds no sequence of "
                f"{length} tokens ({per / 2**20:.1f} MiB each in this cache)"
            )
        return min(cap, budget // per)

    def _cache_for(
        self, slots: int, length: int, compression: KVCompressionConfig | None, lookahead: int
    ) -> KVCache:
        """A cache of `slots` slots for sequences of up to `length` tokens, reused when the
        last one fits; `lookahead` extra entries per slot for a verify step's drafts."""
        a, c = self.model.args, compression
        if c is not None:
            # A row holds at most `budget` entries after prefill or a compression, and gains
            # at most `interval` before the next one.
            small = min(length, c.budget + c.interval)
            old = self.cache
            if not (
                isinstance(old, CompressedKVCache)
                and old.fits_compressed(slots, small, length, self.dtype, c, lookahead)
            ):
                self.cache = old = None  # free the old one before allocating
                self._graphs = None
                self.cache = CompressedKVCache(
                    a.num_layers, slots, small, length, a.num_heads, a.num_kv_heads,
                    a.head_dim, c, self.dtype, self.device, self.cpu_kernels, lookahead,
                )  # fmt: skip
            assert self.cache is not None
            return self.cache
        if (
            self.cache is None
            or isinstance(self.cache, CompressedKVCache)
            or not self.cache.fits(slots, length, self.dtype, lookahead)
        ):
            self.cache = None  # free the old one before allocating
            self._graphs = None
            self.cache = KVCache(
                a.num_layers, slots, length, a.num_kv_heads, a.head_dim, self.dtype, self.device,
                self.cpu_kernels, lookahead,
            )  # fmt: skip
        return self.cache

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> list[Completion]:
        """n completions per prompt, prompt-major: result[i * n + j] is sample j of prompt i.

        compress=False decodes this call against a dense cache even when the engine has
        `kv_compression` (a Sparse-RL run's held-out evaluation of the model as deployed).
        drafter: this call's drafter instead of the engine's `speculative.drafter` ("none":
        plain decoding; e.g. "mtp" to measure the MTP module of an engine that drafts by SAM);
        it drafts one chain a row.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_seq_len:
            raise ValueError(f"a prompt has {longest} tokens; max_seq_len is {self.max_seq_len}")
        spec = self.speculative or SpeculativeConfig()
        name = spec.drafter if drafter is None else drafter
        k = spec.max_draft_tokens if name != "none" else 0
        multi = spec.max_chains > 1 and (drafter is None or drafter == spec.drafter)
        chains: DraftLength = spec.chains if multi else 1
        # A step writes up to this many entries past a row's length (its chains' drafts).
        ahead = spec.max_step_drafts if multi else k
        run = Run(self, prompts, params, n, self.compression if compress else None, lookahead=ahead)
        step: DecodeStep = PlainStep()
        if name != "none":
            if "mtp" in name and self.mtp is None:
                raise ValueError(f"drafter {name!r} needs an MTP module; this engine has none")
            if compress and self.compression is not None and self.compression.policy == "h2o":
                raise ValueError("speculative decoding does not combine with the h2o policy")
            settings = DraftSettings(
                k, spec.sam_min_match, self.mtp, self.static_corpus, spec.mtp_vocab,
                self.token_counts, spec.sam_match == "latest", spec.mtp_draft == "argmax",
            )  # fmt: skip
            host_drafter = DRAFTERS.get(name)(run, settings)
            # Padded steps over a dense cache with a drafter that has a device form: the
            # verify steps never sync (`SyncFreeSpecStep`); else the host drafts each step.
            on_device = getattr(host_drafter, "on_device", None)
            device_drafter = (
                on_device() if on_device and run.graphs and run.cache.device_lengths else None
            )
            if device_drafter is not None:
                step = SyncFreeSpecStep(
                    run, device_drafter, spec.draft_tokens, spec.max_batch, chains,
                    tuple(spec.chain_order()) if multi else (), spec.adaptive_draft,
                )  # fmt: skip
            elif multi:
                raise ValueError(
                    f"speculative.draft_chains ({spec.max_chains}) needs the verify step that "
                    "never syncs: CUDA graphs over a dense cache (this call: cuda_graphs "
                    f"{self.cuda_graphs}, dense cache {run.cache.device_lengths})"
                )
            else:
                step = SpecStep(
                    host_drafter, spec.draft_tokens, spec.max_batch, spec.adaptive_draft
                )
        return run.execute(step)
