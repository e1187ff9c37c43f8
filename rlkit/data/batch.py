"""The one container that crosses actor boundaries: a batch of prompt + response sequences.

Sequences are right-padded to a common length `L`; response-shaped tensors are padded to the
longest response `T`. Response token j of sample i sits at `input_ids[i, prompt_lens[i] + j]`
and is predicted by the hidden state one position earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, L] int64, prompt + response, right-padded with 0
    attention_mask: torch.Tensor  # [N, L] int64
    prompt_lens: torch.Tensor  # [N] int64
    response_ids: torch.Tensor  # [N, T] int64
    response_mask: torch.Tensor  # [N, T] float32: 1 where the token counts in the loss
    sampler_logp: torch.Tensor  # [N, T] float32: log-probs under the sampling distribution
    rewards: torch.Tensor  # [N] float32
    group_ids: torch.Tensor  # [N] int64: samples of one prompt share an id
    advantages: torch.Tensor | None = None  # [N, T] float32

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @classmethod
    def from_sequences(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        sampler_logps: Sequence[Sequence[float]],
        rewards: Sequence[float],
        group_ids: Sequence[int],
        loss_mask: Sequence[bool] | None = None,
    ) -> RolloutBatch:
        n = len(prompts)
        if not (len(responses) == len(sampler_logps) == len(rewards) == len(group_ids) == n):
            raise ValueError(
                "prompts, responses, sampler_logps, rewards and group_ids must have one entry per sample"
            )
        total = max(len(p) + len(r) for p, r in zip(prompts, responses))
        t_max = max(1, max(len(r) for r in responses))
        input_ids = torch.zeros(n, total, dtype=torch.long)
        attention = torch.zeros(n, total, dtype=torch.long)
        response_ids = torch.zeros(n, t_max, dtype=torch.long)
        response_mask = torch.zeros(n, t_max, dtype=torch.float32)
        sampler_logp = torch.zeros(n, t_max, dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(prompts, responses, sampler_logps)):
            seq = list(p) + list(r)
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[i, : len(seq)] = 1
            if r:
                response_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
                sampler_logp[i, : len(r)] = torch.tensor(list(lp), dtype=torch.float32)
                if loss_mask is None or loss_mask[i]:
                    response_mask[i, : len(r)] = 1.0
        return cls(
            input_ids=input_ids,
            attention_mask=attention,
            prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.long),
            response_ids=response_ids,
            response_mask=response_mask,
            sampler_logp=sampler_logp,
            rewards=torch.tensor(list(rewards), dtype=torch.float32),
            group_ids=torch.tensor(list(group_ids), dtype=torch.long),
        )

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """Rows `index` (bool mask or int indices), with padding trimmed to the rows kept."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        kw: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kw[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        out = RolloutBatch(**kw)
        return out.trim()

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch with every tensor on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        kw = {
            f.name: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return RolloutBatch(**kw)

    def trim(self) -> RolloutBatch:
        """Drop trailing columns that are padding in every row."""
        seq_len = int(self.attention_mask.sum(1).max().item()) if len(self) else 0
        resp_len = (
            int((self.attention_mask.sum(1) - self.prompt_lens).max().item()) if len(self) else 0
        )
        resp_len = max(1, resp_len)
        self.input_ids = self.input_ids[:, :seq_len]
        self.attention_mask = self.attention_mask[:, :seq_len]
        for name in ("response_ids", "response_mask", "sampler_logp", "advantages"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[:, :resp_len])
        return self

    def split(self, micro_batch_size: int) -> list[RolloutBatch]:
        """Consecutive micro-batches of at most `micro_batch_size` sequences."""
        idx = torch.arange(len(self))
        return [self.select(chunk) for chunk in idx.split(micro_batch_size)]
