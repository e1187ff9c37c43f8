"""KV compression policies for Sparse-RL rollouts (ALGORITHMS.md section 3).

A policy is a pure function `policy(inputs, cfg) -> indices` registered by name in
`POLICIES`. It sees one layer's cached entries of a batch of sequences that all hold more
than `cfg.budget` entries and returns, per sequence (and per kv head, or one row shared by
all heads), exactly `cfg.budget` entry indices to keep, ascending: [B, KVH or 1, budget].
The last `cfg.window` entries of each sequence are always among them (`keep_top`).

Entries are indices into a sequence's cache row, not token positions. With the ordered
compaction a row holds a subset of the tokens in their original order, the newest at the end.
With the fill compaction (`KVCompressionConfig.fills`) a compression moves only the kept
entries past the budget into the places evicted below it, so the first `budget` places are in
no order, and the ones after them (the tokens since) are in order; the cache then hands the
policy `CompressionInputs.order`, the row's entries sorted by position, and every score is
taken in that order (`_in_order`) before pooling and selection: the policy returns indices
into the sorted order and keeps what it would keep in an ordered row. Either way the last
`window` entries are the last `window` tokens (the fill layout needs window <= interval), and
the `window` stored queries (`CompressionInputs.queries`) are those tokens' queries, the query
i of them sitting at entry `length - window + i`.

`KVCompressedCache` (kv_cache.py) gathers the inputs, calls the policy and compacts the rows;
`layer_hybrid` is a layer scheme as well as a policy: the cache never compresses its full
layers and hands the compressed ones the preceding full layer's scores as `oracle`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlkit.algorithms.registry import Registry
from rlkit.config.schema import KVCompressionConfig
from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import kv_compress


@dataclass
class CompressionInputs:
    # [B, KVH, L, D] cached keys (RoPE applied); entries at or past lengths[b] are padding.
    keys: torch.Tensor
    # [B] valid entries per sequence (each > budget).
    lengths: torch.Tensor
    # [B, H, window, D] queries of the last `window` tokens, oldest first (snapkv, rkv).
    queries: torch.Tensor | None = None
    # [B, KVH, L] attention each entry has received so far (h2o).
    accumulated: torch.Tensor | None = None
    # [B, L] per-entry scores from the preceding full layer (layer_hybrid).
    oracle: torch.Tensor | None = None
    # [B, KVH, L] each row's entries sorted by their tokens' positions (padding last), where
    # the cache's rows are not in that order (the fill compaction); the policy's scores are
    # taken in this order and the indices it returns are into it. None: rows are in order.
    order: torch.Tensor | None = None
    # Score and select with the CPU C kernels where they apply (bf16 keys on the CPU and the
    # kernels built); the PyTorch code below is their reference.
    kernels: bool = False


Policy = Callable[[CompressionInputs, KVCompressionConfig], torch.Tensor]
POLICIES: Registry[Policy] = Registry("kv compression policy")


def validate(cfg: KVCompressionConfig) -> None:
    if cfg.policy != "none" and cfg.policy not in POLICIES:
        raise ValueError(f"unknown kv compression policy {cfg.policy!r}; valid: {POLICIES.names()}")
    if cfg.window < 1 or cfg.budget <= cfg.window:
        raise ValueError(f"need 1 <= window < budget, got window {cfg.window}, budget {cfg.budget}")
    if cfg.interval < 1:
        raise ValueError(f"interval must be >= 1, got {cfg.interval}")
    if cfg.policy == "streaming" and not 0 <= cfg.sink <= cfg.budget - cfg.window:
        raise ValueError(f"need 0 <= sink <= budget - window, got sink {cfg.sink}")
    if cfg.pool_kernel < 1:
        raise ValueError(f"pool_kernel must be >= 1, got {cfg.pool_kernel}")
    if cfg.full_every < 1:
        raise ValueError(f"full_every must be >= 1, got {cfg.full_every}")
    if cfg.compaction == "fill" and not cfg.can_fill():
        raise ValueError(
            f"compaction fill needs policy snapkv, rkv or h2o and window <= interval, got "
            f"policy {cfg.policy}, window {cfg.window}, interval {cfg.interval}"
        )


def keep_top(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int, kernels: bool = False
) -> torch.Tensor:
    """Indices [B, X, budget], ascending, of the `budget` entries to keep: the last `window`
    valid entries, then the highest `scores` [B, X, L] among the other valid ones.
    kernels=True selects with the CPU kernel (same choice, no sort) when it applies."""
    L = scores.shape[-1]
    if kernels and scores.device.type == "cpu" and budget <= L and cpu_kernels.available(None):
        return cpu_kernels.keep_top(scores.float(), lengths, budget, window)
    # CUDA: the Triton kernel (no sort, no host sync); else the reference's stable sort: ties
    # (max-pooling makes plateaus of equal scores) go to the earlier entry whatever the row's
    # padding, so a sequence keeps the same entries in any batch.
    return kv_compress.keep_top(scores.float(), lengths.to(scores.device), budget, window)


def window_attention(
    queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, kernels: bool = False
) -> torch.Tensor:
    """Attention probabilities [B, KVH, L] (float32) that the last `window` queries
    [B, H, window, D] give the entries, averaged over the queries and the query heads of
    each kv head's group. Query i sits at entry `length - window + i` and sees only entries up
    to it (causal), and never the padding. kernels=True computes it with the CPU kernel,
    reading `keys` in place, where it applies (bf16 or float32 on the CPU); CUDA tensors go
    to the Triton kernel of `rlkit.kernels.kv_compress`."""
    B, H, w, D = queries.shape
    kvh, L = keys.shape[1], keys.shape[2]
    if (
        kernels
        and keys.device.type == "cpu"
        and keys.dtype == queries.dtype
        and cpu_kernels.supports_heads(H, kvh, D, keys.dtype)
        and queries.stride(-1) == keys.stride(-1) == 1
        and bool(((lengths >= w) & (lengths <= L)).all())
        and cpu_kernels.available(keys.dtype)
    ):
        return cpu_kernels.window_scores(queries, keys, lengths)
    # CUDA: the Triton kernel; else the reference (float32 math).
    return kv_compress.window_scores(queries, keys, lengths.to(keys.device))


def _in_order(scores: torch.Tensor, inputs: CompressionInputs) -> torch.Tensor:
    """Per-entry scores [B, X, L] in the tokens' order (`CompressionInputs.order`)."""
    if inputs.order is None:
        return scores
    order = inputs.order[..., : scores.shape[-1]]
    return scores.expand(-1, order.shape[1], -1).gather(-1, order)


def pooled_importance(inputs: CompressionInputs, kernel: int) -> torch.Tensor:
    """SnapKV's score [B, KVH, L]: window attention max-pooled along the tokens' order."""
    assert inputs.queries is not None, "this policy needs the window's queries"
    scores = window_attention(inputs.queries, inputs.keys, inputs.lengths, inputs.kernels)
    scores = _in_order(scores, inputs)
    if kernel <= 1:
        return scores
    B, kvh, L = scores.shape
    pooled = F.max_pool1d(scores.reshape(B * kvh, 1, L), kernel, stride=1, padding=kernel // 2)
    return pooled[..., :L].reshape(B, kvh, L)


def redundancy(
    keys: torch.Tensor, lengths: torch.Tensor, threshold: float, kernels: bool = False
) -> torch.Tensor:
    """R-KV's redundancy [B, KVH, L]: mean cosine similarity of each key to the other valid
    keys of its head, similarities under `threshold` counted as 0. kernels=True computes it
    with the CPU kernel where it applies (bf16 or float32 keys on the CPU); there, entries past a row's
    length get 0 (here they get a value that `keep_top` never reads)."""
    B, kvh, L, D = keys.shape
    if (
        kernels
        and keys.device.type == "cpu"
        and D % (16 if keys.dtype == torch.bfloat16 else 8) == 0
        and D <= 256
        and keys.stride(-1) == 1
        and cpu_kernels.available(keys.dtype)
    ):
        return cpu_kernels.redundancy(keys, lengths, threshold)
    valid = torch.arange(L, device=keys.device) < lengths.to(keys.device)[:, None]  # [B, L]
    others = (lengths.to(keys.device) - 1).clamp(min=1).float()[:, None, None]
    out = torch.empty(B, kvh, L, dtype=torch.float32, device=keys.device)
    # Rows per chunk so that one [rows, KVH, L, L] similarity block stays near 32M floats.
    rows = max(1, (1 << 25) // max(1, kvh * L * L))
    eye = torch.eye(L, dtype=torch.bool, device=keys.device)
    for s in range(0, B, rows):
        kn = F.normalize(keys[s : s + rows].float(), dim=-1)
        sim = kn @ kn.transpose(-1, -2)  # [r, KVH, L, L]
        sim = sim.masked_fill(sim < threshold, 0.0).masked_fill(eye, 0.0)
        sim = sim * valid[s : s + rows, None, None, :]
        out[s : s + rows] = sim.sum(dim=-1) / others[s : s + rows]
    return out


@POLICIES.register("snapkv")
def snapkv(inputs: CompressionInputs, cfg: KVCompressionConfig) -> torch.Tensor:
    scores = pooled_importance(inputs, cfg.pool_kernel)
    return keep_top(scores, inputs.lengths, cfg.budget, cfg.window, inputs.kernels)


@POLICIES.register("rkv")
def rkv(inputs: CompressionInputs, cfg: KVCompressionConfig) -> torch.Tensor:
    importance = pooled_importance(inputs, cfg.pool_kernel)
    red = _in_order(
        redundancy(inputs.keys, inputs.lengths, cfg.rkv_threshold, inputs.kernels), inputs
    )
    lam = cfg.rkv_lambda
    scores = lam * importance - (1 - lam) * red
    return keep_top(scores, inputs.lengths, cfg.budget, cfg.window, inputs.kernels)


@POLICIES.register("h2o")
def h2o(inputs: CompressionInputs, cfg: KVCompressionConfig) -> torch.Tensor:
    assert inputs.accumulated is not None, "h2o needs the accumulated attention"
    L = inputs.keys.shape[2]
    acc = _in_order(inputs.accumulated[..., :L], inputs)
    return keep_top(acc, inputs.lengths, cfg.budget, cfg.window, inputs.kernels)


def _recency(inputs: CompressionInputs, sink: int) -> torch.Tensor:
    """Scores [B, 1, L] that rank newer entries higher, the first `sink` entries highest."""
    assert inputs.order is None, "recency reads the entries' places: an ordered row"
    B, L = inputs.keys.shape[0], inputs.keys.shape[2]
    idx = torch.arange(L, device=inputs.keys.device, dtype=torch.float32)
    scores = idx.masked_fill(idx < sink, math.inf)
    return scores.expand(B, 1, L)


@POLICIES.register("streaming")
def streaming(inputs: CompressionInputs, cfg: KVCompressionConfig) -> torch.Tensor:
    scores = _recency(inputs, cfg.sink)
    return keep_top(scores, inputs.lengths, cfg.budget, cfg.window, inputs.kernels)


@POLICIES.register("layer_hybrid")
def layer_hybrid(inputs: CompressionInputs, cfg: KVCompressionConfig) -> torch.Tensor:
    """A compressed layer of the hybrid scheme: the entries the preceding full layer ranks
    highest (`inputs.oracle`), or the most recent `budget` with `cfg.hybrid_local`."""
    if cfg.hybrid_local:
        scores = _recency(inputs, 0)
    else:
        assert inputs.oracle is not None, "layer_hybrid needs the full layer's scores"
        scores = inputs.oracle[:, None, : inputs.keys.shape[2]]
    return keep_top(scores, inputs.lengths, cfg.budget, cfg.window, inputs.kernels)


def oracle_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    kernel: int,
    kernels: bool = False,
) -> torch.Tensor:
    """A full layer's per-token ranking [B, L] for the compressed layers after it: SnapKV's
    pooled window attention, averaged over kv heads (one token set per sequence, as heads of
    different layers do not correspond)."""
    inputs = CompressionInputs(keys, lengths, queries, kernels=kernels)
    return pooled_importance(inputs, kernel).mean(dim=1)
