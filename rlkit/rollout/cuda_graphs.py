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
this class feeds the tokens through a fixed buffer too. Rows B..P-1 of a bucket are padding over free slots. The
weights are updated in place by a weight sync (`load_weights` copies), so graphs stay valid;
a new cache (a different size) gets new graphs. Sampling and everything on the host stay
outside the graph.

`capture=False` runs the same padded step eagerly: the path tested on machines without CUDA.
"""

from __future__ import annotations

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


class DecodeGraphs:
    def __init__(self, model: Decoder, cache: KVCache, capture: bool = True):
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = buckets(cache.num_slots)
        # Fixed token buffers per tokens-per-row.
        self.tokens: dict[int, torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps: dict[tuple[int, int], int] = {}  # steps run per (bucket, tokens per row)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def step(self, batch: int, fed: torch.Tensor) -> torch.Tensor:
        """One decode step of slots 0..batch-1 fed tokens fed [batch, T]: hidden states
        [batch, T, hidden] (a view of the graph's output, valid until the next step)."""
        pad, T = self.bucket(batch), fed.shape[1]
        key = (pad, T)
        self.steps[key] = self.steps.get(key, 0) + 1
        positions = self.cache.begin_decode(batch, T, pad_to=pad)
        if T not in self.tokens:
            self.tokens[T] = torch.zeros(
                (self.cache.num_slots, T), dtype=torch.long, device=self.cache.device
            )
        self.tokens[T][:batch].copy_(fed[:batch])
        tokens = self.tokens[T][:pad]
        if not self.capture:
            return self.model.forward_cached(tokens, positions, self.cache)[:batch]
        if key not in self.graphs:
            self.graphs[key] = self._capture(tokens, positions)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:batch]

    def _capture(
        self, tokens: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy initialisation, Triton compilation), then capture.
        # Both run this step's own inputs, so the cache writes they make are the step's own:
        # the replay that follows writes the same values again.
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            self.model.forward_cached(tokens, positions, self.cache)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.forward_cached(tokens, positions, self.cache)
        return graph, out
