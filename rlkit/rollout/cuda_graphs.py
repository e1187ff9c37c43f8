"""Decode steps replayed from CUDA graphs (one token per row, or a verify step's k + 1).

On a GPU a one-token decode step of a small model is bound by launching its kernels from
Python (~10 per layer), not by the GPU: at batch 32 the H100 spends ~25 ms per step whatever
the batch or context (benchmarks/NOTES.md). `DecodeGraphs` captures the model's decode forward
once per padded batch size (a bucket: 1, 2, 4, 8, ... up to the cache's slots) and tokens per
row (1 for plain steps, k + 1 for speculative verify steps) and replays it: one launch per
step instead of hundreds.

What makes a step replayable: the cache's `begin_decode(B, T, pad_to=P)` writes the step's
write indices, lengths and positions into one device buffer per T that never moves and spans
every row's whole capacity (the attention kernel reads only each row's length; several tokens
per row attend through a causal mask built inside the forward from the write indices), and
this class feeds the tokens through a fixed buffer too. Rows B..P-1 of a bucket are padding
over free slots. The weights are updated in place by a weight sync (`load_weights` copies), so
graphs stay valid; a new cache (a different size) gets new graphs. Sampling and everything on
the host stay outside the graph.

`StepGraphs` is the mechanism for any step function over a cache (its inputs in fixed
buffers); `DecodeGraphs` is the policy's step on it, and the MTP drafter's block steps
(`drafters.MTPDrafter`: the catch-up over k + 1 verified pairs, then one token per further
depth, on its own one-layer cache) are another, captured per `generate` call.

`capture=False` runs the same padded step eagerly: the path tested on machines without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlkit.models.decoder import Decoder
from rlkit.rollout.kv_cache import KVCache


def buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_batch`, then `max_batch`."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class StepGraphs:
    """Padded steps of `fn(*inputs, positions)` over `cache`, replayed from CUDA graphs: one
    graph per (bucket, T). Each input is fed as [batch, T, ...] and copied into a fixed buffer
    of the cache's slots; `cache.begin_decode(batch, T, pad_to=bucket)` writes the step's
    write indices, lengths and positions into the cache's own fixed buffers; the outputs (a
    tensor or a tuple of them, each [bucket, T, ...]) are returned for rows 0..batch-1, as
    views valid until the next step of the same key. The policy's decode step
    (`DecodeGraphs`: tokens in, hidden states out) and the MTP drafter's block steps (states
    and tokens in, its states out) are both this."""

    def __init__(self, fn: Callable[..., Any], cache: KVCache, capture: bool = True):
        self.fn, self.cache, self.capture = fn, cache, capture
        self.buckets = buckets(cache.num_slots)
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}  # fixed buffers per T
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.steps: dict[tuple[int, int], int] = {}  # steps run per (bucket, tokens per row)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def step(self, batch: int, *fed: torch.Tensor) -> Any:
        """One step of slots 0..batch-1 fed inputs [batch, T, ...] (all the same T)."""
        pad, T = self.bucket(batch), fed[0].shape[1]
        key = (pad, T)
        self.steps[key] = self.steps.get(key, 0) + 1
        positions = self.cache.begin_decode(batch, T, pad_to=pad)
        if T not in self.inputs:
            self.inputs[T] = tuple(
                torch.zeros(
                    (self.cache.num_slots, *x.shape[1:]), dtype=x.dtype, device=self.cache.device
                )
                for x in fed
            )
        buffers = self.inputs[T]
        for buf, x in zip(buffers, fed, strict=True):
            buf[:batch].copy_(x[:batch])
        args = tuple(buf[:pad] for buf in buffers)
        if not self.capture:
            return _rows(self.fn(*args, positions), batch)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args, positions)
        graph, out = self.graphs[key]
        graph.replay()
        return _rows(out, batch)

    def _capture(
        self, args: tuple[torch.Tensor, ...], positions: torch.Tensor
    ) -> tuple[torch.cuda.CUDAGraph, Any]:
        # Warm up on a side stream (lazy initialisation, Triton compilation), then capture.
        # Both run this step's own inputs, so the cache writes they make are the step's own:
        # the replay that follows writes the same values again.
        device = positions.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.fn(*args, positions)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*args, positions)
        return graph, out


def _rows(out: Any, batch: int) -> Any:
    return tuple(o[:batch] for o in out) if isinstance(out, tuple) else out[:batch]


class DecodeGraphs(StepGraphs):
    """The policy's decode step: tokens [batch, T] in, final hidden states [batch, T, hidden]
    out (a view of the graph's output, valid until the next step).

    `extra`: other steps over the same cache, kept (and dropped) with it: the speculative
    verify steps, one per sampling setting (`steps.SpecStep`, `steps.SyncFreeSpecStep`)."""

    def __init__(self, model: Decoder, cache: KVCache, capture: bool = True):
        super().__init__(
            lambda tokens, positions: model.forward_cached(tokens, positions, cache),
            cache,
            capture,
        )
        self.extra: dict[Any, Any] = {}
        self._slot_state: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot_state(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's token to feed next and tokens generated per slot [slots] (`Run.last`,
        `Run.count_dev`), zeroed: kept with the graphs, at fixed addresses, so that a step
        captured over them (`steps.SyncFreeSpecStep`, which advances them itself) serves
        every `generate` call on this cache."""
        last, count = self.slot_state_all()
        last.zero_()
        count.zero_()
        return last[:slots], count[:slots]

    def slot_state_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`slot_state`'s tensors over all the cache's slots (not zeroed)."""
        if self._slot_state is None:
            n, dev = self.cache.num_slots, self.cache.device
            self._slot_state = (
                torch.zeros(n, dtype=torch.long, device=dev),
                torch.zeros(n, dtype=torch.long, device=dev),
            )
        return self._slot_state
