"""Training forward with each group's prompt computed once (shared-prefix attention).

GRPO scores n completions of the same prompt. Running prompt + completion per sample computes
the prompt n times; here the prompts run once, their keys/values are kept (with autograd), and
every completion attends to its prompt's keys/values plus its own. Exact: same hidden states
and same gradients as the per-sample forward (tests/models/test_shared_prefix.py).

The prompt is split as prefix = prompt[:-1] and suffix = prompt[-1:] + response[:-1], so the
suffix hidden state at index j is the one that predicts response token j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlkit.models.decoder import Decoder


class _RecordPrefix:
    """Causal attention over the (right-padded) prefixes; keeps each layer's keys/values."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k[layer], self.v[layer] = k, v  # [G, KVH, P, D]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class _AttendToPrefix:
    """Suffix queries attend to their group's prefix (up to its length) and causally to themselves."""

    # attend() only reads the recorded prefix: gradient checkpointing may re-run it.
    recomputable = True

    def __init__(self, prefix: _RecordPrefix, group: torch.Tensor, mask: torch.Tensor) -> None:
        self.prefix = prefix
        self.group = group  # [N] index of each row's prefix
        self.mask = mask  # [N, 1, S, P + S] bool

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all = torch.cat([self.prefix.k[layer][self.group], k], dim=2)  # [N, KVH, P + S, D]
        v_all = torch.cat([self.prefix.v[layer][self.group], v], dim=2)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self.mask, enable_gqa=True)


def response_hidden(
    model: Decoder,
    input_ids: torch.Tensor,  # [N, L] prompt + response, right-padded
    prompt_lens: torch.Tensor,  # [N]
    seq_lens: torch.Tensor,  # [N] prompt + response lengths
    group_ids: torch.Tensor,  # [N] rows with equal ids have identical prompts
) -> torch.Tensor:
    """Hidden states [N, R, H] where [i, j] predicts response token j of row i (R = longest response)."""
    n = input_ids.shape[0]
    device = input_ids.device
    groups, row_group = torch.unique(group_ids, return_inverse=True)  # [G], [N]
    first = torch.zeros(len(groups), dtype=torch.long, device=device).scatter_(
        0, row_group.flip(0), torch.arange(n - 1, -1, -1, device=device)
    )  # [G] one row of each group
    pre_lens = prompt_lens[first] - 1  # [G]
    if bool((pre_lens < 1).any()):
        raise ValueError("shared-prefix forward needs prompts of at least 2 tokens")
    cols_all = torch.arange(input_ids.shape[1], device=device)
    in_prompt = cols_all < prompt_lens[:, None]  # [N, L]
    if bool(((input_ids != input_ids[first][row_group]) & in_prompt).any()) or bool(
        (prompt_lens != prompt_lens[first][row_group]).any()
    ):
        raise ValueError("rows with equal group_ids must have identical prompts")
    p = int(pre_lens.max())
    cols = torch.arange(p, device=device)
    prefix_ids = torch.where(cols < pre_lens[:, None], input_ids[first, :p], 0)  # [G, P]
    prefix_pos = cols.expand(len(groups), p)
    record = _RecordPrefix()
    model.forward_cached(prefix_ids, prefix_pos, record)

    resp_lens = seq_lens - prompt_lens  # [N]
    r = max(1, int(resp_lens.max()))
    steps = torch.arange(r, device=device)
    src = (prompt_lens[:, None] - 1 + steps).clamp(max=input_ids.shape[1] - 1)  # [N, R]
    suffix_ids = input_ids.gather(1, src)  # [N, R]
    suffix_pos = prompt_lens[:, None] - 1 + steps  # [N, R] true positions
    prefix_ok = cols[None, None, :] < pre_lens[row_group][:, None, None]  # [N, 1, P]
    causal = steps[None, :, None] >= steps[None, None, :]  # [1, R, R]
    mask = torch.cat([prefix_ok.expand(n, r, p), causal.expand(n, r, r)], dim=2)[
        :, None
    ]  # [N, 1, R, P + R]
    return model.forward_cached(suffix_ids, suffix_pos, _AttendToPrefix(record, row_group, mask))
