"""Preallocated dense KV cache with one row ("slot") per running sequence.

Storage: `k`, `v` [layers, slots, kv_heads, max_len, head_dim] (heads before positions, so a
batch's keys `k[layer, :B, :, :L]` are already in attention's [B, KVH, L, D] layout, a view
with no copy). Keys are stored after RoPE. Each slot has

- `lengths[s]`: entries stored (the cache length), and
- `positions[s]`: the true position of the sequence's next token.

In dense decoding the two are equal. They are kept apart for what extends this cache:

- Compressed KV (Sparse-RL): a policy picks the entries to keep in a slot, gathers them to
  the front of the row and lowers `lengths[s]`; `positions[s]` keeps counting, and because
  keys were rotated at their true positions nothing is re-rotated. Per-layer budgets turn
  `lengths` into [layers, slots] and the mask below into one per layer. The policy sees the
  queries through `attend` (SnapKV scores the last window's attention).
- Draft verification (MTP / SAM speculative decoding): `begin_decode(B, T)` takes T >= 1 new
  tokens per slot, writes them after each slot's entries and builds a causal mask among them;
  rejected drafts are dropped by lowering `lengths` and `positions` again (`rewind`), and
  their stale entries are overwritten by the next step.

The engine keeps its running sequences in slots 0..B-1 (it compacts after sequences finish),
so decoding reads a prefix of the slots. Lengths live on the host as well as on the device,
so that building a step needs no device-to-host sync.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
    ):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len, self.device = num_slots, max_len, torch.device(device)
        self.lengths = np.zeros(num_slots, dtype=np.int64)
        self.positions = np.zeros(num_slots, dtype=np.int64)
        self._mode: str | None = None

    def fits(self, num_slots: int, max_len: int, dtype: torch.dtype) -> bool:
        return self.num_slots >= num_slots and self.max_len >= max_len and self.k.dtype == dtype

    @property
    def bytes_per_token(self) -> int:
        layers, _, heads, _, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()

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

    def begin_decode(self, batch: int, new_tokens: int = 1) -> torch.Tensor:
        """Next forward appends `new_tokens` tokens to each of slots 0..batch-1; returns their
        true positions [batch, new_tokens]."""
        self._mode = "decode"
        start = torch.from_numpy(self.lengths[:batch].copy()).to(self.device)  # [B]
        pos0 = torch.from_numpy(self.positions[:batch].copy()).to(self.device)
        steps = torch.arange(new_tokens, device=self.device)
        self._write = start[:, None] + steps  # [B, T]
        self._kv_len = int(self.lengths[:batch].max()) + new_tokens
        keys = torch.arange(self._kv_len, device=self.device)
        # Query t of slot b sees entries before its own write index, and itself.
        mask = keys[None, None, :] <= self._write[:, :, None]  # [B, T, L]
        self._mask = mask[:, None]  # [B, 1, T, L]
        self.lengths[:batch] += new_tokens
        self.positions[:batch] += new_tokens
        return pos0[:, None] + steps

    def rewind(self, counts: np.ndarray) -> None:
        """Forget the last counts[b] entries of slots 0..len(counts)-1 (rejected drafts)."""
        self.lengths[: len(counts)] -= counts
        self.positions[: len(counts)] -= counts

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [B, KVH, T, D] of the new tokens, return attention of q [B, H, T, D]."""
        if self._mode == "prefill":
            # Fresh sequences: their keys are exactly the new ones, causal within the prompt.
            self.k[layer, self._slots, :, : k.shape[2]] = k[self._rows]
            self.v[layer, self._slots, :, : v.shape[2]] = v[self._rows]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        B, H, T, D = q.shape
        kvh = k.shape[1]
        slots = torch.arange(B, device=self.device)[:, None]  # [B, 1]
        # Advanced indices around a slice: the indexed view is [B, T, KVH, D].
        self.k[layer][slots, :, self._write] = k.transpose(1, 2)
        self.v[layer][slots, :, self._write] = v.transpose(1, 2)
        keys = self.k[layer, :B, :, : self._kv_len]  # [B, KVH, L, D]
        values = self.v[layer, :B, :, : self._kv_len]
        # The G query heads that share a kv head become G*T query rows of that head: plain
        # SDPA on [B, KVH, G*T, D] runs much faster on CPU than its GQA mode for short T.
        group = H // kvh
        qg = q.reshape(B, kvh, group * T, D)
        mask = self._mask if T == 1 else self._mask.repeat(1, 1, group, 1)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return out.view(B, H, T, D)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots src[i] -> dst[i] (compaction after sequences finish)."""
        if not src:
            return
        n = int(self.lengths[src].max())
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self.k[:, d, :, :n] = self.k[:, s, :, :n]
        self.v[:, d, :, :n] = self.v[:, s, :, :n]
        self.lengths[dst] = self.lengths[src]
        self.positions[dst] = self.positions[src]
