"""Decode steps: the tensors of one step of every running sequence (the scheduler's runner).

- `PlainStep`: one token per sequence, sampled from the policy.
- `SpecStep`: a drafter (`drafters.py`) proposes up to k tokens per sequence, one forward of
  the policy scores the last token and the drafts (T = 1 + drafts per row), and the
  verification rule (`rlkit.kernels.spec_verify`) keeps a per-row prefix of the drafts plus
  one token, so that the emitted tokens follow the policy's sampling distribution exactly.
  The cache rewinds the rejected entries.

Both run the policy's forward through `forward_tokens`, which takes T >= 1 tokens per row the
same three ways: a padded step replayed from a CUDA graph (`cuda_graphs.py`), the fused CPU
step on the C kernels (`Decoder.forward_decode_fused`), or PyTorch ops.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlkit.device import to_device
from rlkit.kernels.spec_verify import verify_drafts
from rlkit.rollout.sampling import sampling_logprobs

if TYPE_CHECKING:
    from rlkit.rollout.drafters import Drafter
    from rlkit.rollout.scheduler import Run


def forward_tokens(run: Run, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, hidden] of tokens [B, T] fed to slots 0..B-1."""
    B, T = tokens.shape
    if run.graphs is not None:
        return run.graphs.step(B, tokens)
    positions = run.cache.begin_decode(B, T)  # [B, T]
    if run.e.fused_decode:
        return run.model.forward_decode_fused(tokens, positions, run.cache)
    return run.model.forward_cached(tokens, positions, run.cache)


class PlainStep:
    """One sampled token per sequence."""

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        pass

    def step(self, run: Run) -> None:
        B = len(run.seq)
        hidden = forward_tokens(run, run.last[:B, None])
        run.sample_emit(hidden[:, -1])

    def moved(self, src: list[int], dst: list[int]) -> None:
        pass

    def finished(self, seqs: list[int]) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}


class SpecStep:
    """Draft, verify, emit 1..k+1 tokens per sequence (module docstring).

    Each row drafts at most k tokens, fewer near its token limit and before the cache's next
    compression check (`KVCache.draft_room`); rows with fewer drafts than the step's widest
    are padded and their extra entries rewound with the rejected ones. Under CUDA graphs every
    step that drafts feeds k + 1 tokens, so one graph per batch bucket serves every such step.

    max_batch > 0: while more sequences run, no row drafts (room 0): the step feeds one token
    per row and draws it from the policy's distribution as a plain step does, and the drafter
    still observes every token (the MTP module runs its catch-up block over it), so drafting
    resumes where the batch has shrunk.
    """

    def __init__(self, drafter: Drafter, num_draft_tokens: int, max_batch: int = 0):
        self.drafter, self.k, self.max_batch = drafter, num_draft_tokens, max_batch
        self.plain_steps = 0
        self.steps = self.seq_steps = self.emitted = self.drafted = self.accepted = 0
        self.draft_seconds = 0.0

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        self.drafter.admitted(run, first, seqs, hidden)

    def moved(self, src: list[int], dst: list[int]) -> None:
        self.drafter.moved(src, dst)

    def finished(self, seqs: list[int]) -> None:
        self.drafter.finished(seqs)

    def step(self, run: Run) -> None:
        B, dev, params = len(run.seq), run.device, run.params
        room = np.minimum(self.k, run.limit - run.count - 1)  # the last token is the verifier's
        bound = run.cache.draft_room(B)
        if bound is not None:
            room = np.minimum(room, bound)
        room = np.maximum(room, 0)
        if self.max_batch and B > self.max_batch:
            room = np.zeros_like(room)
        t0 = time.perf_counter()
        draft = self.drafter.propose(run, room)  # tokens [B, k], num [B] <= room
        self.draft_seconds += time.perf_counter() - t0
        width = int(draft.num.max())
        if not width:
            # No row drafts (a batch over max_batch, or every row at its limit): a plain step,
            # which the drafter still observes.
            hidden = forward_tokens(run, run.last[:B, None])
            tok, tok_logp = run.sample(hidden[:, -1])
            run.emit_one(tok, tok_logp)
            one = np.ones(B, dtype=np.int64)
            self.drafter.observed(run, hidden, tok[:, None], one, tok[:, None].cpu().numpy())
            self.plain_steps += 1
            return
        if run.graphs is not None:
            width = self.k  # one graph per bucket serves every drafting step
        T = width + 1
        drafts = draft.tokens[:, :width]
        hidden = forward_tokens(run, torch.cat([run.last[:B, None], drafts], dim=1))  # [B, T, H]
        # The sampling distribution at every fed position: [B, T, V] log-probs.
        flat = hidden.reshape(B * T, -1)
        logp = torch.cat(
            [
                sampling_logprobs(run.model.logits(flat[i : i + run.sample_rows]), params)
                for i in range(0, B * T, run.sample_rows)
            ]
        ).view(B, T, -1)
        num = to_device(draft.num, dev)
        if params.temperature == 0:
            accepted, token = verify_drafts(logp, drafts, num, greedy=True)
        else:
            # k + 1 uniforms whatever the step's width (the last draws the final token): a
            # padded step and an eager one make the same decisions from the same seed.
            u = torch.rand(B, self.k + 1, generator=run.gen, dtype=torch.float64, device=dev)
            u = torch.cat([u[:, :width], u[:, self.k :]], dim=1)  # [B, T]
            q = None if draft.probs is None else draft.probs[:, :width]
            accepted, token = verify_drafts(logp.exp(), drafts, num, q, u)
        # Emitted: the kept drafts, then the verifier's token.
        emitted = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # [B, T]
        emitted.scatter_(1, accepted[:, None], token[:, None])
        emitted_logp = logp.gather(-1, emitted[:, :, None])[..., 0]  # [B, T]
        # The step's one host sync: the kept counts and the emitted tokens in one copy.
        host = torch.cat([accepted[:, None], emitted], dim=1).cpu().numpy()
        kept, emitted_host = host[:, 0], host[:, 1:]
        run.cache.rewind(T - 1 - kept)
        run.emit(emitted, emitted_logp, accepted + 1, kept + 1)
        self.drafter.observed(run, hidden, emitted, kept + 1, emitted_host)
        self.steps += 1
        self.seq_steps += B
        self.emitted += int(kept.sum()) + B
        self.drafted += int(draft.num.sum())
        self.accepted += int(kept.sum())

    def stats(self) -> dict[str, float]:
        """spec/accept_len_mean: tokens emitted per sequence and verify step (accepted drafts
        + 1); spec/accept_rate: accepted / drafted tokens; spec/drafted_per_step: drafts per
        sequence and verify step; spec/draft_ms: the drafter's time per decode step, verify
        and plain (in a plain step it only catches up on the new token); spec/plain_steps:
        steps where no row drafted (over max_batch, or every row at its limit)."""
        steps = max(self.seq_steps, 1)
        return {
            "spec/accept_len_mean": self.emitted / steps,
            "spec/accept_rate": self.accepted / max(self.drafted, 1),
            "spec/drafted_per_step": self.drafted / steps,
            "spec/draft_ms": 1000 * self.draft_seconds / max(self.steps + self.plain_steps, 1),
            "spec/verify_steps": float(self.steps),
            "spec/plain_steps": float(self.plain_steps),
        }
