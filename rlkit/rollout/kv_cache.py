"""Preallocated dense KV cache with one row ("slot") per running sequence.

Storage: `k`, `v` [layers, slots, kv_heads, max_len, head_dim] (heads before positions, so a
batch's keys `k[layer, :B, :, :L]` are already in attention's [B, KVH, L, D] layout, a view
with no copy). Keys are stored after RoPE. Each slot has

- `lengths[s]`: entries stored (the cache length), and
- `positions[s]`: the true position of the sequence's next token.

In dense decoding the two are equal. They are kept apart for what extends this cache:

- Compressed KV (Sparse-RL, `CompressedKVCache` below): a policy picks the entries to keep
  in a slot, gathers them to the front of the row and lowers the slot's length;
  `positions[s]` keeps counting, and because keys were rotated at their true positions
  nothing is re-rotated. Lengths there are per (layer group, slot), masks per group.
- Draft verification (MTP / SAM speculative decoding): `begin_decode(B, T)` takes T >= 1 new
  tokens per slot, writes them after each slot's entries and attends causally among them;
  rejected drafts are dropped by lowering `lengths` and `positions` again (`rewind`), and
  their stale entries are overwritten by the next step. `lookahead` extra entries per slot
  (the drafts a step may feed) are allocated past the capacity, so that a step near a slot's
  limit, or a padding row of a step, can write its T entries before the rewind.

The engine keeps its running sequences in slots 0..B-1 (it compacts after sequences finish),
so decoding reads a prefix of the slots. Lengths live on the host as well as on the device,
so that building a step needs no device-to-host sync.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rlkit.config.schema import KVCompressionConfig
from rlkit.device import compiled_kernels, to_device
from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import kv_compress, rope_append
from rlkit.kernels import sparse_decode_attention as sda
from rlkit.kernels.sparse_decode_attention import sparse_decode_attention
from rlkit.models.decoder import FusedTarget
from rlkit.rollout.compression import POLICIES, CompressionInputs, oracle_scores, validate


class RopeTarget(NamedTuple):
    """A layer's storage and step buffers for `KVCache.attend_rope`: keys and values
    [slots, KVH, L, D], the step's write indices [B, T], each row's entries after it [B], the
    entries the step's attention spans, the query ring and its entry (or None), and whether the
    one-launch RoPE + append + attention may take it."""

    k: torch.Tensor
    v: torch.Tensor
    write: torch.Tensor
    lens: torch.Tensor
    kv_len: int
    ring_store: torch.Tensor | None
    ring: torch.Tensor | None
    fusable: bool


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        cpu_kernels: bool = True,
        lookahead: int = 0,
    ):
        # Storage: the capacity plus the entries a verify step may write past it.
        self.max_len, self.lookahead = max_len + lookahead, lookahead
        shape = (num_layers, num_slots, num_kv_heads, self.max_len, head_dim)
        self.cpu_kernels = cpu_kernels
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.device = num_slots, torch.device(device)
        self.lengths = np.zeros(num_slots, dtype=np.int64)
        self.positions = np.zeros(num_slots, dtype=np.int64)
        self._mode: str | None = None
        # Padded steps' inputs per tokens-per-row (`_padded_inputs`).
        self._static: dict[int, torch.Tensor] = {}

    def fits(self, num_slots: int, max_len: int, dtype: torch.dtype, lookahead: int = 0) -> bool:
        return (
            self.num_slots >= num_slots
            and self.capacity >= max_len
            and self.lookahead >= lookahead
            and self.k.dtype == dtype
        )

    @staticmethod
    def slot_bytes(
        num_layers: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> int:
        """Bytes one slot of a cache built with these arguments holds: a dense row is the
        whole sequence, K and V of every layer (what `rollout.kv_memory_gb` divides)."""
        return 2 * num_layers * num_kv_heads * (max_len + lookahead) * head_dim * dtype.itemsize

    @property
    def held_bytes(self) -> int:
        """Bytes of every per-slot tensor the cache allocated (its K/V and the statistics a
        compressed cache keeps): `slot_bytes` times the slots."""
        return self.allocated_bytes

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token in every layer."""
        return self.k.shape[0] * self.bytes_per_entry

    @property
    def bytes_per_entry(self) -> int:
        """KV bytes of one entry of one layer."""
        heads, dim = self.k.shape[2], self.k.shape[4]
        return 2 * heads * dim * self.k.element_size()

    @property
    def capacity(self) -> int:
        """Most tokens (prompt + completion) a slot can hold."""
        return self.max_len - self.lookahead

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def entries_held(self, slot: int) -> int:
        """KV entries a slot holds, summed over layers."""
        return self.k.shape[0] * int(self.lengths[slot])

    def begin_prefill(self, slots: torch.Tensor, rows: torch.Tensor, lengths: list[int]) -> None:
        """Next forward holds new sequences: batch row `rows[i]` (a prompt, right-padded) is
        written to slot `slots[i]`; several slots may take the same row (n samples per prompt
        share one prefill)."""
        self._mode = "prefill"
        self._slots, self._rows = slots.to(self.device), rows.to(self.device)
        idx = slots.tolist()
        src = np.asarray(lengths, dtype=np.int64)[rows.tolist()]
        self.lengths[idx] = src
        self.positions[idx] = src
        # Row i to slot first + i (one sample per prompt): the fused step writes the rows'
        # entries straight into the slots (`fused_target`).
        first = idx[0] if idx else 0
        direct = rows.tolist() == list(range(len(lengths))) == [i - first for i in idx]
        self._prefill_first = first if direct and idx else None
        self._prefill_lens = torch.full((len(idx),), max(lengths, default=0), device=self.device)

    def reset_slots(self, slots: list[int] | range, positions: np.ndarray) -> None:
        """Empty `slots`; their next entry is at true position `positions[i]` (a drafter's
        cache, which starts at the completion instead of holding the prompt)."""
        idx = list(slots)
        self.lengths[idx] = 0
        self.positions[idx] = positions

    def draft_room(self, batch: int) -> np.ndarray | None:
        """Tokens each of slots 0..batch-1 may draft before the cache needs a check
        (`CompressedKVCache`); None: no bound."""
        return None

    def compress_due(self, batch: int) -> int:
        """After a step: compress the slots due for it (`CompressedKVCache`)."""
        return 0

    def _padded_inputs(self, batch: int, pad: int, host: np.ndarray) -> torch.Tensor:
        """Copy a padded step's inputs host [rows, pad, T] (int64) into the cache's fixed
        device buffer for T tokens per row [rows, slots, T], allocated on first use and never
        moved, so that a CUDA graph captured over its views reads each step's values; returns
        buf[:, :pad]."""
        if not batch <= pad <= self.num_slots:
            raise ValueError(f"pad_to must be in [{batch}, {self.num_slots}], got {pad}")
        rows, _, T = host.shape
        if T not in self._static:
            self._static[T] = torch.zeros(
                (rows, self.num_slots, T), dtype=torch.long, device=self.device
            )
        buf = self._static[T][:, :pad]
        src = torch.from_numpy(host)
        # Pinned and asynchronous on CUDA: the host queues the step without waiting for the
        # previous ones (PyTorch's pinned-memory cache keeps `src` until the copy has run).
        cuda = self.device.type == "cuda"
        buf.copy_(src.pin_memory() if cuda else src, non_blocking=cuda)
        return buf

    def begin_decode(
        self, batch: int, new_tokens: int = 1, pad_to: int | None = None
    ) -> torch.Tensor:
        """Next forward appends `new_tokens` tokens to each of slots 0..batch-1; returns their
        true positions [batch, new_tokens].

        pad_to=P (batch <= P <= slots): a step of P rows whose inputs live in one fixed device
        buffer and whose attention spans every row's whole storage (only each row's length
        counts), so the same forward, captured once as a CUDA graph, runs every step of P rows
        and T tokens. Rows batch..P-1 are padding: free slots, written at entries 0..T-1.
        Returns positions [P, T]."""
        self._mode = "decode"
        self._chain = 0
        if pad_to is not None:
            return self._begin_padded(batch, pad_to, new_tokens)
        start = to_device(self.lengths[:batch], self.device)  # [B]
        pos0 = to_device(self.positions[:batch], self.device)
        steps = torch.arange(new_tokens, device=self.device)
        self._write = start[:, None] + steps  # [B, T]
        self._kv_len = int(self.lengths[:batch].max()) + new_tokens
        self._lens = self._write[:, -1] + 1  # [B] entries each slot's last query sees
        self.lengths[:batch] += new_tokens
        self.positions[:batch] += new_tokens
        return pos0[:, None] + steps

    def _begin_padded(self, batch: int, pad: int, T: int) -> torch.Tensor:
        steps = np.arange(T)
        host = np.zeros((3, pad, T), dtype=np.int64)  # write index, length (col 0), position
        host[0] = steps
        host[0, :batch] += self.lengths[:batch, None]
        host[1, :, 0] = host[0, :, -1] + 1
        host[2, :batch] = self.positions[:batch, None] + steps
        buf = self._padded_inputs(batch, pad, host)
        self._write, self._lens = buf[0], buf[1, :, 0]
        self._kv_len = self.max_len
        self.lengths[:batch] += T
        self.positions[:batch] += T
        return buf[2]

    def rewind(self, counts: np.ndarray) -> None:
        """Forget the last counts[b] entries of slots 0..len(counts)-1 (rejected drafts)."""
        self.lengths[: len(counts)] -= counts
        self.positions[: len(counts)] -= counts

    # -- lengths kept on the device (`steps.SyncFreeSpecStep`) -------------------------------
    #
    # A step that advances each row by a count only the device knows (a verify step that
    # never syncs) keeps the lengths in device tensors between host syncs: `lengths_to_device`
    # after the host changed them (admission, compaction), `begin_decode_device` and
    # `advance_device` inside the step (capturable: no host reads or writes), and
    # `lengths_from_device` with the values the host read at its sync. Only a dense cache
    # (whose lengths are its positions) drives its lengths this way: a compressed cache's
    # trigger is on the host (`device_lengths` is False there). Each slot's true positions
    # are its entries' indices plus an offset (0 for a policy's cache; a drafter's cache
    # starts at the completion: `reset_slots`).

    device_lengths = True
    _chain = 0  # the step's tree of draft chains (`begin_decode_device`)

    def lengths_to_device(self, batch: int, first: int = 0) -> torch.Tensor:
        """Slots first..batch-1's host lengths (and position offsets) into the device tensors
        the device-driven steps read and advance (allocated once, never moved); returns the
        lengths [slots]."""
        if not hasattr(self, "_len_dev"):
            self._len_dev = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
            self._off_dev = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        rows = slice(first, batch)
        self._len_dev[rows].copy_(to_device(self.lengths[rows], self.device))
        self._off_dev[rows].copy_(to_device(self.positions[rows] - self.lengths[rows], self.device))
        return self._len_dev

    def begin_decode_device(
        self, active: torch.Tensor, new_tokens: int, chain: int = 0
    ) -> torch.Tensor:
        """`begin_decode` of a padded step of P = len(active) rows from the device lengths:
        row b's tokens go to entries len[b].. when active[b], else to entries 0.. (a free slot,
        or a row at its limit whose entries nothing reads again). Returns positions [P, T].

        chain c > 0: the T = 1 + C * c tokens are a tree of C draft chains after the row's
        last token (`rlkit.kernels.spec_verify.verify_chains`): chain j's token i sits at
        position len + 1 + i and attends to the entries before the step, the last token's and
        its own chain's earlier ones; `keep_path` then keeps one path's entries."""
        P, T = active.shape[0], new_tokens
        if T not in self._static:
            self._static[T] = torch.zeros(
                (3, self.num_slots, T), dtype=torch.long, device=self.device
            )
        buf = self._static[T][:, :P]
        start = torch.where(active, self._len_dev[:P], 0)
        buf[0] = start[:, None] + torch.arange(T, device=self.device)
        buf[1, :, 0] = buf[0, :, -1] + 1
        depth = torch.arange(T, device=self.device)
        if chain:
            depth = torch.cat([depth[:1], depth[1 : chain + 1].repeat((T - 1) // chain)])
        buf[2] = start[:, None] + depth + torch.where(active, self._off_dev[:P], 0)[:, None]
        self._mode = "decode"
        self._write, self._lens = buf[0], buf[1, :, 0]
        self._kv_len = self.max_len
        self._chain = chain
        return buf[2]

    def keep_path(self, path: torch.Tensor, active: torch.Tensor) -> None:
        """After a tree step (`begin_decode_device` with chain), before `advance_device`:
        active rows b keep the step's entries path[b, i] (indices into the step's T tokens,
        [P, n]) as entries len[b] + 1 + i, the accepted chain's entries after the last
        token's (capturable; entries moved past what a row keeps are never read)."""
        P, n = path.shape
        base = self._len_dev[:P, None]
        dst = base + 1 + torch.arange(n, device=self.device)
        src = torch.where(active[:, None], base + path, dst)
        rows = torch.arange(P, device=self.device)[:, None]
        # [layers, slots, KVH, L, D] indexed [:, rows, :, entries]: [P, n, layers, KVH, D].
        self.k[:, rows, :, dst] = self.k[:, rows, :, src]
        self.v[:, rows, :, dst] = self.v[:, rows, :, src]

    def lengths_on_device(self, batch: int) -> torch.Tensor:
        """Slots 0..batch-1's device lengths [batch] (a view)."""
        return self._len_dev[:batch]

    def advance_device(self, num: torch.Tensor) -> None:
        """Rows 0..len(num)-1 keep num[b] of the entries the step wrote (capturable)."""
        self._len_dev[: num.shape[0]] += num

    def lengths_from_device(self, lengths: np.ndarray) -> None:
        """The host's copy of slots 0..len(lengths)-1's device lengths, read at a sync."""
        B = len(lengths)
        offset = self.positions[:B] - self.lengths[:B]
        self.lengths[:B] = lengths
        self.positions[:B] = lengths + offset

    def move_device(self, src: list[int], dst: list[int]) -> None:
        """`move` for slots whose lengths only the device knows (a drafter's cache on the
        sync-free path): every entry and the device lengths and offsets."""
        if not src:
            return
        s, d = to_device(src, self.device), to_device(dst, self.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]
        self._len_dev[d] = self._len_dev[s]
        self._off_dev[d] = self._off_dev[s]
        self.lengths[dst] = self.lengths[src]
        self.positions[dst] = self.positions[src]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [B, KVH, T, D] of the new tokens, return attention of q [B, H, T, D]."""
        if self._mode == "prefill":
            # Fresh sequences: their keys are exactly the new ones, causal within the prompt.
            self.k[layer, self._slots, :, : k.shape[2]] = k[self._rows]
            self.v[layer, self._slots, :, : v.shape[2]] = v[self._rows]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        B = q.shape[0]
        slots = torch.arange(B, device=self.device)[:, None]  # [B, 1]
        # Advanced indices around a slice: the indexed view is [B, T, KVH, D].
        self.k[layer][slots, :, self._write] = k.transpose(1, 2)
        self.v[layer][slots, :, self._write] = v.transpose(1, 2)
        return self._attend_stored(layer, q)

    def attend_rope(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor | None:
        """`attend` before RoPE: q [B, T, H, D], k/v [B, T, KVH, D], cos/sin [B, 1, T, D]. A
        decode step on a GPU rotates q and k and stores k and v in one kernel
        (`rlkit.kernels.rope_append`), and for one token a row over rows short enough for it
        attends in the same launch (`sparse_decode_attention.rope_decode_applies`); None
        where the caller rotates and calls `attend`."""
        if self._mode != "decode" or not rope_append.applies(q):
            return None
        t = self._rope_target(layer)
        if q.shape[1] == 1 and t.fusable and sda.rope_decode_applies(q, t.kv_len, k.shape[2]):
            B = q.shape[0]
            out = sda.rope_decode_attention_triton(
                q, k, v, cos, sin, t.k[:B, :, : t.kv_len], t.v[:B, :, : t.kv_len], t.lens,
                t.ring_store, t.ring, **sda.FUSED_KNOBS,
            )  # fmt: skip
            return out[:, :, None]
        q_rot = rope_append.rope_append(q, k, v, cos, sin, t.write, t.k, t.v, t.ring_store, t.ring)
        return self._attend_stored(layer, q_rot)

    def _rope_target(self, layer: int) -> RopeTarget:
        """Where a decode step's RoPE'd keys and values go in `layer` (`attend_rope`)."""
        return RopeTarget(
            self.k[layer], self.v[layer], self._write, self._lens, self._kv_len, None, None, True
        )

    def _attend_stored(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """A decode step's attention of q [B, H, T, D] once its tokens' k/v are stored."""
        B = q.shape[0]
        keys = self.k[layer, :B, :, : self._kv_len]  # [B, KVH, L, D]
        values = self.v[layer, :B, :, : self._kv_len]
        # Each row's queries over its own entries, the step's T new ones last (writes are
        # contiguous: query t sees those before lens - (T - 1 - t)): the decode kernel, which
        # for T > 1 (a verify step) on a GPU reads each row once up to its length.
        return sparse_decode_attention(
            q, keys, values, self._lens, cpu_kernel=self.cpu_kernels, chain=self._chain
        )

    def fused_target(self, layer: int) -> FusedTarget | None:
        """The fused step's view of `layer` (see `FusedDecodeCache`), after `begin_decode(B,
        T)`, or after `begin_prefill` that maps row i to slot first + i (None for another
        prefill: `attend` copies a row to each of its slots): the rows' slots and length T
        (the padded width; entries past a prompt's length are overwritten by its decode)."""
        if self._mode == "prefill":
            if self._prefill_first is None:
                return None
            s, B = self._prefill_first, self._prefill_lens.shape[0]
            return (
                self.k[layer, s : s + B],
                self.v[layer, s : s + B],
                self._prefill_lens,
                None,
                None,
            )
        B = self._lens.shape[0]
        return self.k[layer, :B], self.v[layer, :B], self._lens, None, None

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots src[i] -> dst[i] (compaction after sequences finish)."""
        if not src:
            return
        n = int(self.lengths[src].max())
        s, d = to_device(src, self.device), to_device(dst, self.device)
        self.k[:, d, :, :n] = self.k[:, s, :, :n]
        self.v[:, d, :, :n] = self.v[:, s, :, :n]
        self.lengths[dst] = self.lengths[src]
        self.positions[dst] = self.positions[src]


def causal_mask(write: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, kv_len] bool: query t of row b sees the entries up to its own write index
    write[b, t] (those before it and itself)."""
    keys = torch.arange(kv_len, device=write.device)
    return (keys[None, None, :] <= write[:, :, None])[:, None]


class CompressedKVCache(KVCache):
    """KV cache whose rows hold a compressed subset of each sequence's tokens (Sparse-RL).

    `cfg` (KVCompressionConfig) names the policy (`rollout/compression.py`). Every sequence
    (slot) keeps its own entries, gathered to the front of its row in their original order,
    so the last `window` entries are always the newest tokens; `positions[s]` keeps counting
    the true positions (keys were rotated at them when computed, nothing is re-rotated).

    Per-layer lengths. Layers whose entries are always chosen at the same moments hold the
    same number of them, so lengths are kept per *length group* and per slot,
    `group_lengths` [groups, slots], and `layer_lengths` expands them to [layers, slots]:
    one group (every layer) for snapkv / rkv / h2o / streaming; for `layer_hybrid` group 0 is
    the compressed layers and group 1 the full layers (every `full_every`-th, never
    compressed). `lengths` is group 0's row (a view).

    Storage. Compressed layers live in `k`, `v` [compressed layers, slots, KVH, max_len, D]
    with max_len only what a row can hold between compressions (budget + interval: a prompt
    longer than the budget is compressed while it is written); full layers of `layer_hybrid`
    in `kf`, `vf` [full layers, slots, KVH, full_len, D]. Both add `lookahead` entries: the
    drafts a verify step writes before its rejected ones are rewound.

    Statistics, kept only for the policies that read them:
    - `queries` [layers that need them, slots, H, window + lookahead, D]: each slot's recent
      queries in a ring (position p at p % ring), for snapkv / rkv (every layer) and the full
      layers of layer_hybrid; scores are computed only when compressing, from the last
      `window`. The ring's `lookahead` spare places keep the queries of rejected drafts from
      overwriting them.
    - `accumulated` [layers, slots, KVH, max_len] float32 (h2o): attention received so far;
      decode attention is computed explicitly, to get the probabilities, only under h2o.
    - `entry_pos` [full layers, slots, max_len] (layer_hybrid, oracle): the true position of
      each entry of the compressed layers after full layer g (all of them keep the same set),
      to look up the full layer's scores.

    Compression happens inside prefill (a prompt longer than the budget: SnapKV scores use the
    prompt's last `window` queries) and in `compress`. The cache owns the trigger, in tokens:
    `since[s]` counts the tokens slot s gained since its last check, and `compress_due`, which
    the engine calls after every step, checks each slot that reached `cfg.interval` (so what a
    sequence keeps does not depend on its batch). `draft_room` bounds a verify step's drafts so
    that no step crosses a check: the checks fall on the same tokens as one-token decoding's,
    and a speculative sparse rollout is the same sparse policy. `events` counts (sequence,
    layer) compressions.
    """

    # Its compression trigger is on the host: verify steps sync (`KVCache.device_lengths`).
    device_lengths = False

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        full_len: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        cfg: KVCompressionConfig,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        cpu_kernels: bool = True,
        lookahead: int = 0,
    ):
        validate(cfg)
        self.cfg = cfg
        self.cpu_kernels = cpu_kernels
        self.policy = POLICIES.get(cfg.policy)
        self.num_layers, self.num_slots, self.device = num_layers, num_slots, torch.device(device)
        # Storage sizes, with room for a verify step's drafts.
        self.lookahead = lookahead
        self.max_len = min(max_len, full_len) + lookahead
        self.full_len = full_len + lookahead
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.full_layers, self.comp_layers, q_layers, self.oracle = _layer_roles(num_layers, cfg)
        # layer -> (group, index in its store); group 0: compressed (k, v), 1: full (kf, vf).
        self.where = {i: (0, j) for j, i in enumerate(self.comp_layers)}
        self.where.update({i: (1, j) for j, i in enumerate(self.full_layers)})
        kv = (num_slots, num_kv_heads)
        self.k = torch.zeros(
            (len(self.comp_layers), *kv, self.max_len, head_dim), dtype=dtype, device=device
        )
        self.v = torch.zeros_like(self.k)
        self.kf = torch.zeros(
            (len(self.full_layers), *kv, self.full_len, head_dim), dtype=dtype, device=device
        )
        self.vf = torch.zeros_like(self.kf)
        self.group_lengths = np.zeros((2, num_slots), dtype=np.int64)
        self.lengths = self.group_lengths[0]  # a view: updated with group_lengths
        self.positions = np.zeros(num_slots, dtype=np.int64)
        self.since = np.zeros(num_slots, dtype=np.int64)  # tokens since the last check
        # Ring of the recent queries, for the layers whose scores need them.
        self.q_index = {i: j for j, i in enumerate(q_layers)}
        self.ring = cfg.window + lookahead
        self.queries = torch.zeros(
            (len(q_layers), num_slots, num_heads, self.ring, head_dim), dtype=dtype, device=device
        )
        self.h2o = cfg.policy == "h2o"
        self.accumulated = torch.zeros(
            (len(self.comp_layers) if self.h2o else 0, *kv, self.max_len),
            dtype=torch.float32,
            device=device,
        )
        self.entry_pos = torch.zeros(
            (len(self.full_layers) if self.oracle else 0, num_slots, self.max_len),
            dtype=torch.long,
            device=device,
        )
        # The fill compaction (`KVCompressionConfig.fills`): per compressed layer, slot and kv head
        # the order of places 0..budget-1 by their tokens' positions (the places of the
        # oldest entry first; identity where a row was never filled). A row's entries past
        # the budget are the tokens since its last compression, in order and newer than all
        # of them. Allocated only where this cache fills, as `compressed_slot_bytes(...,
        # fills=...)` counts it (the engine sizes its batch from a slot's bytes before the
        # cache, with the same choice: `cache_fills`).
        self.fill = cache_fills(cfg, device)
        self.slot_order = torch.empty(
            (len(self.comp_layers) if self.fill else 0, num_slots, num_kv_heads, cfg.budget),
            dtype=_order_dtype(cfg.budget),
            device=device,
        )
        self.slot_order.copy_(torch.arange(cfg.budget, device=device).expand_as(self.slot_order))
        self.events = 0
        self._mode: str | None = None
        self._static: dict[int, torch.Tensor] = {}

    # -- sizes -----------------------------------------------------------------------------

    def fits(self, num_slots: int, max_len: int, dtype: torch.dtype, lookahead: int = 0) -> bool:
        raise NotImplementedError("the engine sizes a CompressedKVCache with fits_compressed")

    def fits_compressed(
        self,
        num_slots: int,
        max_len: int,
        full_len: int,
        dtype: torch.dtype,
        cfg: KVCompressionConfig,
        lookahead: int = 0,
    ) -> bool:
        la = self.lookahead
        return (
            self.cfg == cfg
            and self.num_slots >= num_slots
            and la >= lookahead
            and self.max_len - la >= min(max_len, full_len)
            and self.full_len - la >= full_len
            and self.k.dtype == dtype
        )

    @staticmethod
    def compressed_slot_bytes(
        num_layers: int,
        max_len: int,
        full_len: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        cfg: KVCompressionConfig,
        dtype: torch.dtype,
        lookahead: int = 0,
        *,
        fills: bool,
    ) -> int:
        """Bytes one slot of a `CompressedKVCache` built with these arguments holds: the
        compressed layers' K/V rows of min(max_len, full_len) entries (the engine passes
        budget + interval: what a row holds at most between compressions), the full layers'
        rows of full_len, each plus `lookahead`, and the policy's statistics (query ring,
        H2O's accumulated attention, layer_hybrid's entry positions); fills: whether the cache
        compacts by filling (`cache_fills` of its config and device), which keeps each
        row's order of places."""
        full, comp, q_layers, oracle = _layer_roles(num_layers, cfg)
        m, f = min(max_len, full_len) + lookahead, full_len + lookahead
        item = dtype.itemsize
        kv = 2 * num_kv_heads * head_dim * item  # K and V of one entry of one layer
        total = len(comp) * m * kv + len(full) * f * kv
        total += len(q_layers) * num_heads * (cfg.window + lookahead) * head_dim * item
        if cfg.policy == "h2o":
            total += len(comp) * num_kv_heads * m * 4  # float32
        if oracle:
            total += len(full) * m * 8  # int64
        if fills:
            order = _order_dtype(cfg.budget).itemsize  # the head's order (`slot_order`)
            total += len(comp) * num_kv_heads * cfg.budget * order
        return total

    @property
    def held_bytes(self) -> int:
        tensors = (self.k, self.v, self.kf, self.vf, self.queries, self.accumulated)
        extra = (self.entry_pos, self.slot_order)
        return sum(t.numel() * t.element_size() for t in (*tensors, *extra))

    @property
    def capacity(self) -> int:
        return self.full_len - self.lookahead

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_entry

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kf, self.vf))

    @property
    def layer_lengths(self) -> np.ndarray:
        """Entries held per (layer, slot): [layers, slots]."""
        groups = np.array([self.where[i][0] for i in range(self.num_layers)])
        return self.group_lengths[groups]

    def entries_held(self, slot: int) -> int:
        compressed, full = self.group_lengths[:, slot].tolist()
        return len(self.comp_layers) * compressed + len(self.full_layers) * full

    def _store(self, layer: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        group, j = self.where[layer]
        if group == 0:
            return group, self.k[j], self.v[j]
        return group, self.kf[j], self.vf[j]

    # -- prefill ---------------------------------------------------------------------------

    def begin_prefill(self, slots: torch.Tensor, rows: torch.Tensor, lengths: list[int]) -> None:
        self._mode = "prefill"
        self._slots, self._rows = slots.to(self.device), rows.to(self.device)
        self._row_len = np.asarray(lengths, dtype=np.int64)
        # Rows (prompts) longer than the budget, compressed as they are written.
        self._squeeze = np.nonzero(self._row_len > self.cfg.budget)[0]
        self._oracle_scores: dict[int, torch.Tensor] = {}
        idx = slots.tolist()
        src = self._row_len[rows.tolist()]
        self.group_lengths[0, idx] = np.minimum(src, self.cfg.budget)
        self.group_lengths[1, idx] = src
        self.positions[idx] = src
        self.since[idx] = 0
        if self.fill:  # a prompt's kept entries are written in order
            self.slot_order[:, idx] = torch.arange(self.cfg.budget, device=self.device).to(
                self.slot_order.dtype
            )
        self.events += int((src > self.cfg.budget).sum()) * len(self.comp_layers)

    def _last_queries(
        self, q: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `window` queries [R, H, w, D] of right-padded prompts q [R, H, T, D], and
        their positions [R, w] (negative where a prompt is shorter than the window)."""
        R, H, _, D = q.shape
        w = self.cfg.window
        pos = lengths[:, None] - w + torch.arange(w, device=q.device)  # [R, w]
        idx = pos.clamp(min=0)[:, None, :, None].expand(R, H, w, D)
        return q.gather(2, idx), pos

    def _prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        R, H, T, D = q.shape
        cfg, slots, rows = self.cfg, self._slots, self._rows
        lens = to_device(self._row_len, self.device)
        colsum = None
        if self.h2o:
            out, colsum = _causal_attention_with_colsum(q, k, v, lens)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        group, ks, vs = self._store(layer)
        last_q = None
        if layer in self.q_index:
            last_q, pos = self._last_queries(q, lens)
            ring = pos.remainder(self.ring)[rows]  # [S, w]
            ring_q = self.queries[self.q_index[layer]]
            ring_q[slots[:, None], :, ring] = last_q[rows].transpose(1, 2)
        squeeze = to_device(self._squeeze, self.device)
        if group == 1:  # a full layer of layer_hybrid
            ks[slots, :, :T] = k[rows]
            vs[slots, :, :T] = v[rows]
            if self.oracle and len(self._squeeze) and last_q is not None:
                self._oracle_scores[self.where[layer][1]] = oracle_scores(
                    last_q[squeeze], k[squeeze], lens[squeeze], cfg.pool_kernel, self._kernels()
                )
            return out
        keep = min(T, cfg.budget)
        idx = torch.arange(keep, device=self.device).expand(R, self.num_kv_heads, keep)
        if len(self._squeeze):
            inputs = CompressionInputs(k[squeeze], lens[squeeze], kernels=self._kernels())
            if last_q is not None:
                inputs.queries = last_q[squeeze]
            if colsum is not None:
                inputs.accumulated = colsum[squeeze]
            if self.oracle:
                inputs.oracle = self._oracle_scores[layer // cfg.full_every]
            chosen = self.policy(inputs, cfg)  # [Rc, KVH or 1, budget]
            idx = idx.clone()
            idx[squeeze] = chosen.expand(-1, self.num_kv_heads, -1)
        gidx = idx[..., None].expand(-1, -1, -1, D)
        ks[slots, :, :keep] = k.gather(2, gidx)[rows]
        vs[slots, :, :keep] = v.gather(2, gidx)[rows]
        if colsum is not None:
            self.accumulated[self.where[layer][1]][slots, :, :keep] = colsum.gather(2, idx)[rows]
        if self.oracle:
            self.entry_pos[layer // cfg.full_every][slots, :keep] = idx[:, 0][rows]
        return out

    # -- decode ----------------------------------------------------------------------------

    def begin_decode(
        self, batch: int, new_tokens: int = 1, pad_to: int | None = None
    ) -> torch.Tensor:
        self._mode = "decode"
        self._chain = 0
        if pad_to is not None:
            return self._begin_padded_compressed(batch, pad_to, new_tokens)
        dev = self.device
        pos0 = to_device(self.positions[:batch], dev)
        steps = torch.arange(new_tokens, device=dev)
        self._gwrite: list[torch.Tensor] = []
        self._gkv_len: list[int] = []
        self._glens: list[torch.Tensor] = []
        for g in range(2 if self.full_layers else 1):
            start = to_device(self.group_lengths[g, :batch], dev)
            write = start[:, None] + steps  # [B, T]
            self._gwrite.append(write)
            self._gkv_len.append(int(self.group_lengths[g, :batch].max()) + new_tokens)
            self._glens.append(write[:, -1] + 1)
        if self.q_index:
            self._ring = (pos0[:, None] + steps).remainder(self.ring)  # [B, T]
        if self.oracle:  # the new entries of the compressed layers and their true positions
            slots = torch.arange(batch, device=dev)[:, None]
            self.entry_pos[:, slots, self._gwrite[0]] = pos0[:, None] + steps
        self.group_lengths[:, :batch] += new_tokens
        self.positions[:batch] += new_tokens
        self.since[:batch] += new_tokens
        return pos0[:, None] + steps

    def _begin_padded_compressed(self, batch: int, pad: int, T: int) -> torch.Tensor:
        """`KVCache.begin_decode(pad_to=...)` for the compressed cache: per length group the
        write indices and length, the query ring's indices and the positions in one buffer."""
        groups = 2 if self.full_layers else 1
        steps = np.arange(T)
        host = np.zeros((2 * groups + 2, pad, T), dtype=np.int64)
        for g in range(groups):
            host[2 * g] = steps
            host[2 * g, :batch] += self.group_lengths[g, :batch, None]
            host[2 * g + 1, :, 0] = host[2 * g, :, -1] + 1
        host[-1, :batch] = self.positions[:batch, None] + steps
        host[-2, :batch] = host[-1, :batch] % self.ring
        buf = self._padded_inputs(batch, pad, host)
        self._gwrite = [buf[2 * g] for g in range(groups)]
        self._glens = [buf[2 * g + 1, :, 0] for g in range(groups)]
        self._gkv_len = [self.max_len, self.full_len][:groups]
        if self.q_index:
            self._ring = buf[-2]
        if self.oracle:  # the real rows' new entries and their true positions (not captured)
            slots = torch.arange(batch, device=self.device)[:, None]
            self.entry_pos[:, slots, buf[0, :batch]] = buf[-1, :batch]
        self.group_lengths[:, :batch] += T
        self.positions[:batch] += T
        self.since[:batch] += T
        return buf[-1]

    def rewind(self, counts: np.ndarray) -> None:
        """Forget the last counts[b] entries of slots 0..len(counts)-1 (not across a
        compression: the entries must still be the newest ones)."""
        self.group_lengths[:, : len(counts)] -= counts
        self.positions[: len(counts)] -= counts
        self.since[: len(counts)] -= counts

    def draft_room(self, batch: int) -> np.ndarray | None:
        # A step that feeds t tokens may reach the next check but not pass it.
        return self.cfg.interval - self.since[:batch] - 1

    def compress_due(self, batch: int) -> int:
        due = np.nonzero(self.since[:batch] >= self.cfg.interval)[0]
        if not len(due):
            return 0
        self.since[due] = 0
        return self.compress(due)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._mode == "prefill":
            return self._prefill(layer, q, k, v)
        B = q.shape[0]
        group, ks, vs = self._store(layer)
        write = self._gwrite[group]
        slots = torch.arange(B, device=self.device)[:, None]  # [B, 1]
        ks[slots, :, write] = k.transpose(1, 2)
        vs[slots, :, write] = v.transpose(1, 2)
        if layer in self.q_index:
            self.queries[self.q_index[layer]][slots, :, self._ring] = q.transpose(1, 2)
        return self._attend_stored(layer, q)

    def _rope_target(self, layer: int) -> RopeTarget:
        # The layer's group's storage and step buffers, and SnapKV's query ring where the layer
        # has one. H2O's statistic needs the attention probabilities: not the fused kernel.
        group, ks, vs = self._store(layer)
        ring_store = ring = None
        if layer in self.q_index:
            ring_store, ring = self.queries[self.q_index[layer]], self._ring
        return RopeTarget(
            ks, vs, self._gwrite[group], self._glens[group], self._gkv_len[group], ring_store,
            ring, not self.h2o,
        )  # fmt: skip

    def _attend_stored(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        kvh = self.num_kv_heads
        group, ks, vs = self._store(layer)
        write, kv_len = self._gwrite[group], self._gkv_len[group]
        keys, values = ks[:B, :, :kv_len], vs[:B, :, :kv_len]
        G = H // kvh
        if self.h2o:
            # (Only here: an arange a layer is a launch of every captured step.)
            slots = torch.arange(B, device=self.device)[:, None]  # [B, 1]
            qg = q.reshape(B, kvh, G * T, D).float()
            logits = qg @ keys.float().transpose(-1, -2) / math.sqrt(D)  # [B, KVH, G*T, L]
            mask = causal_mask(write, kv_len).repeat(1, 1, G, 1)
            probs = logits.masked_fill(~mask, -math.inf).softmax(dim=-1)
            acc = self.accumulated[self.where[layer][1]]
            # A fresh entry has received nothing yet. The zero is a device tensor: a Python
            # scalar would be a host-to-device copy, which a CUDA-graph capture refuses.
            acc[slots, :, write] = torch.zeros((), dtype=acc.dtype, device=acc.device)
            acc[:B, :, :kv_len] += probs.sum(dim=2)
            return (probs @ values.float()).to(q.dtype).view(B, H, T, D)
        lens = self._glens[group]
        return sparse_decode_attention(q, keys, values, lens, cpu_kernel=self.cpu_kernels)

    def fused_target(self, layer: int) -> FusedTarget | None:
        """The fused decode step's view of `layer` after `begin_decode(B, T)`; None under H2O
        (its statistic needs the attention probabilities) and in a prefill (prompts are
        compressed as they are written: `attend`)."""
        if self.h2o or self._mode == "prefill":
            return None
        group, ks, vs = self._store(layer)
        lens = self._glens[group]
        B = lens.shape[0]
        if layer in self.q_index:
            ring = self.queries[self.q_index[layer]][:B]
            return ks[:B], vs[:B], lens, ring, self._ring.reshape(-1)  # ring slots [B * T]
        return ks[:B], vs[:B], lens, None, None

    # -- compression during decode ---------------------------------------------------------

    def _kernels(self) -> bool:
        """Whether compressions run on the CPU C kernels: selection and compaction for any
        dtype, SnapKV's and R-KV's scores for the dtypes that have kernels (the policies check
        what they take)."""
        return self.cpu_kernels and self.device.type == "cpu" and cpu_kernels.available(None)

    def compress(self, slots: np.ndarray | list[int]) -> int:
        """Compress those of `slots` whose compressed layers hold more than the budget;
        returns the number of (sequence, layer) compressions."""
        cfg, dev = self.cfg, self.device
        slots = np.asarray(slots, dtype=np.int64)
        rows_np = slots[self.group_lengths[0, slots] > cfg.budget]
        if len(rows_np) == 0 or not self.comp_layers:
            return 0
        rows = to_device(rows_np, dev)
        R, kvh, w = len(rows_np), self.num_kv_heads, cfg.window
        L = int(self.group_lengths[0, rows_np].max())
        lens = to_device(self.group_lengths[0, rows_np], dev)
        ring = None
        if self.q_index:
            qpos = to_device(self.positions[rows_np], dev)[:, None] - w
            ring = (qpos + torch.arange(w, device=dev)).remainder(self.ring)  # [R, w], oldest first
        oracle: dict[int, torch.Tensor] = {}
        chosen_of: dict[int, torch.Tensor] = {}
        if self.oracle:
            assert ring is not None
            Lf = int(self.group_lengths[1, rows_np].max())
            flens = to_device(self.group_lengths[1, rows_np], dev)
            for j, f in enumerate(self.full_layers):
                queries = self.queries[self.q_index[f]][rows[:, None], :, ring].transpose(1, 2)
                scores = oracle_scores(
                    queries, self.kf[j][rows, :, :Lf], flens, cfg.pool_kernel, self._kernels()
                )
                # Entries past a row's length hold stale positions: clamp, keep_top drops them.
                at = self.entry_pos[j][rows, :L].clamp(max=Lf - 1)
                oracle[j] = scores.gather(1, at)  # [R, L]
        # A run of consecutive slots (the usual case: sequences started together) is read in
        # place; other row sets are gathered for the policy. Compaction is in place (C kernels,
        # the Triton kernel on CUDA, or its reference).
        fast = self._kernels()
        span = slice(int(rows_np[0]), int(rows_np[0]) + R)
        in_place = bool((np.diff(rows_np) == 1).all())
        # Fill layout: the places past the head, already in their tokens' order (every layer).
        tail = torch.arange(cfg.budget, L, device=dev).expand(R, kvh, L - cfg.budget)
        for j, layer in enumerate(self.comp_layers):
            keys = self.k[j][span, :, :L] if in_place else self.k[j][rows, :, :L]
            inputs = CompressionInputs(keys, lens, kernels=fast)
            if layer in self.q_index:
                assert ring is not None
                ring_q = self.queries[self.q_index[layer]]
                inputs.queries = ring_q[rows[:, None], :, ring].transpose(1, 2)
            acc = self.accumulated[j][rows, :, :L] if self.h2o else None
            inputs.accumulated = acc
            if self.oracle:
                inputs.oracle = oracle[layer // cfg.full_every]
            if self.fill:  # the head's places by their tokens' order, then the tail
                inputs.order = torch.cat([self.slot_order[j][rows].long(), tail], dim=-1)
            chosen = self.policy(inputs, cfg).expand(-1, kvh, -1)  # [R, KVH, budget]
            stores = (self.k[j], self.v[j]) + ((self.accumulated[j],) if self.h2o else ())
            if inputs.order is not None:
                self._fill(j, rows, inputs.order.gather(-1, chosen), stores, L)
            elif fast:
                for store in stores:
                    cpu_kernels.compact_rows(store, rows, chosen)
            else:  # CUDA: the Triton kernel, in place, no host sync; else its reference
                for store in stores:
                    kv_compress.compact_rows(store, rows, chosen)
            if self.oracle:
                chosen_of[layer // cfg.full_every] = chosen[:, 0]
        for g, chosen in chosen_of.items():
            self.entry_pos[g][rows, : cfg.budget] = self.entry_pos[g][rows, :L].gather(1, chosen)
        self.group_lengths[0, rows_np] = cfg.budget
        n = R * len(self.comp_layers)
        self.events += n
        return n

    def _fill(
        self,
        j: int,
        rows: torch.Tensor,
        kept: torch.Tensor,
        stores: tuple[torch.Tensor, ...],
        L: int,
    ) -> None:
        """The fill compaction of compressed layer j's `rows` keeping the entries at places
        `kept` [R, KVH, budget], in their tokens' order: the kept entries past the budget (the
        last m of `kept`) move into the evicted places below it, in every store; the head's
        order is then the unmoved kept places, then those evicted places, ascending (the i-th
        moved entry went to the i-th of them)."""
        src, dst, head = kv_compress.fill_plan(kept, self.cfg.budget, L)
        for store in stores:
            kv_compress.fill_rows(store, rows, src, dst)
        self.slot_order[j][rows] = head.to(self.slot_order.dtype)

    def move(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        s, d = to_device(src, self.device), to_device(dst, self.device)
        n = int(self.group_lengths[0, src].max())
        self.k[:, d, :, :n] = self.k[:, s, :, :n]
        self.v[:, d, :, :n] = self.v[:, s, :, :n]
        self.accumulated[:, d, :, :n] = self.accumulated[:, s, :, :n]
        self.entry_pos[:, d, :n] = self.entry_pos[:, s, :n]
        if self.full_layers:
            nf = int(self.group_lengths[1, src].max())
            self.kf[:, d, :, :nf] = self.kf[:, s, :, :nf]
            self.vf[:, d, :, :nf] = self.vf[:, s, :, :nf]
        self.queries[:, d] = self.queries[:, s]
        self.slot_order[:, d] = self.slot_order[:, s]
        self.group_lengths[:, dst] = self.group_lengths[:, src]
        self.positions[dst] = self.positions[src]
        self.since[dst] = self.since[src]


def _layer_roles(
    num_layers: int, cfg: KVCompressionConfig
) -> tuple[list[int], list[int], list[int], bool]:
    """(full layers, compressed layers, layers keeping a query ring, oracle) of a compressed
    cache: layer_hybrid keeps every `full_every`-th layer full, the others compress them all;
    snapkv / rkv score from every compressed layer's recent queries, layer_hybrid's oracle
    from its full layers'."""
    hybrid = cfg.policy == "layer_hybrid"
    oracle = hybrid and not cfg.hybrid_local
    full = [i for i in range(num_layers) if hybrid and i % cfg.full_every == 0]
    comp = [i for i in range(num_layers) if i not in full]
    if cfg.policy in ("snapkv", "rkv"):
        q_layers = comp
    else:
        q_layers = full if oracle else []
    return full, comp, q_layers, oracle


def _causal_attention_with_colsum(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of right-padded prompts, explicitly: the output [R, H, T, D] and the
    attention each key received from the prompt's real queries, summed over queries and the
    query heads of its group, [R, KVH, T] float32 (H2O's initial statistic)."""
    R, H, T, D = q.shape
    kvh = k.shape[1]
    G = H // kvh
    qg = q.reshape(R, kvh, G * T, D).float()
    logits = qg @ k.float().transpose(-1, -2) / math.sqrt(D)  # [R, KVH, G*T, T]
    t = torch.arange(T, device=q.device)
    causal = (t[None, :] <= t[:, None]).repeat(G, 1)  # [G*T, T]
    probs = logits.masked_fill(~causal, -math.inf).softmax(dim=-1)
    out = (probs @ v.float()).to(q.dtype).view(R, H, T, D)
    real = (t[None, :] < lengths[:, None]).repeat(1, G)  # [R, G*T]
    colsum = (probs * real[:, None, :, None]).sum(dim=2)
    return out, colsum


def cache_fills(cfg: KVCompressionConfig, device: torch.device | str) -> bool:
    """Whether a `CompressedKVCache` of this config on this device compacts by filling
    (`KVCompressionConfig.fills`: `auto` fills where the device runs the fill's kernels)."""
    return cfg.fills(compiled_kernels(device))


def _order_dtype(budget: int) -> torch.dtype:
    """The narrowest integer type of `CompressedKVCache.slot_order`'s places."""
    return torch.int16 if budget <= torch.iinfo(torch.int16).max else torch.int32
