"""MTP-RL's drafter loss (ALGORITHMS.md section 4): the MTP module's cross-entropy on the
rollout tokens, each token weighted by a function of its advantage.

The paper's exact advantage-aware formula is not public; the variants are registered by name
(`algorithm.mtp.weight`), each mapping advantages A [N, T] to weights >= 0 normalised to mean 1
over the batch's valid tokens (so the loss keeps the plain loss's scale):

- `plain`: w = 1, the peers' loss (slime, verl, AReaL).
- `linear`: w = max(0, 1 + beta * A). A policy-gradient step moves the policy to roughly
  pi_new(y) ~ pi_old(y) (1 + eta A(y)); the rollouts were drawn from pi_old, so weighting them
  by 1 + beta A makes the drafter fit (to first order) the policy the next rollouts come from.
  Negative-advantage tokens keep some weight: the policy still produces most of them.
- `positive`: w = max(0, A): only what the update reinforces (the strongest tilt; zero-advantage
  groups contribute nothing).
- `exp`: w = exp(beta * A) (an exponential tilt, AWR-style; never zero).

Everything here is pure tensors (no module, no optimizer): the learner computes the MTP states
and calls `mtp_token_stats` and `mtp_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlkit.algorithms.registry import Registry

MTP_WEIGHTS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("MTP weight")


@MTP_WEIGHTS.register("plain")
def plain_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.ones_like(adv)


@MTP_WEIGHTS.register("linear")
def linear_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 + beta * adv).clamp(min=0.0)


@MTP_WEIGHTS.register("positive")
def positive_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return adv.clamp(min=0.0)


@MTP_WEIGHTS.register("exp")
def exp_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.exp((beta * adv).clamp(max=20.0))


def mtp_weights(
    advantages: torch.Tensor, mask: torch.Tensor, name: str, beta: float = 0.5
) -> torch.Tensor:
    """Weights [N, T] of variant `name` for advantages [N, T], divided by their mean over
    mask [N, T] (all zero stays zero: such a batch teaches the drafter nothing)."""
    w = MTP_WEIGHTS.get(name)(advantages.float(), beta) * mask  # [N, T]
    mean = w.sum() / mask.sum().clamp(min=1)
    return w / mean if float(mean) > 0 else w


def _chunk_stats(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, jacobian: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log p(target) [C], top-1 hits [C] and, with `jacobian`, d log p(target) / d h [C, H]
    = w[target] - softmax(h w^T) w, for one chunk of float32 rows h [C, H] and head w [V, H]."""
    z = h @ w.T  # [C, V]
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None])[:, 0] - lse
    hit = z.argmax(dim=-1) == targets
    if not jacobian:
        return logp, hit, None
    p = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory
    return logp, hit, w[targets] - p @ w


class _FrozenHeadLogprobs(torch.autograd.Function):
    """log p(target) under a frozen LM head, with its gradient in the states computed in the
    forward pass: the backward only scales each row's d log p / d h by its incoming gradient.
    Each chunk's logits are computed once and the head is read twice (logits, p @ w), where
    checkpointing a chunk computed its logits twice and read the head three times."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, states: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = head.float()
        logps, hits, jacs = [], [], []
        for i in range(0, states.shape[0], chunk):
            h = states[i : i + chunk].float()
            logp, hit, jac = _chunk_stats(h, w, targets[i : i + chunk], True)
            assert jac is not None
            logps.append(logp)
            hits.append(hit)
            jacs.append(jac)
        ctx.save_for_backward(torch.cat(jacs))
        ctx.states_dtype = states.dtype
        hit_all = torch.cat(hits)
        ctx.mark_non_differentiable(hit_all)
        return torch.cat(logps), hit_all

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_logp: torch.Tensor, g_hit: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None]:
        (jac,) = ctx.saved_tensors
        return (g_logp[:, None] * jac).to(ctx.states_dtype), None, None, None


def mtp_token_stats(
    states: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [M] (differentiable in states) and top-1 hits [M] bool of the LM head
    `head` [V, H] (frozen: no gradient reaches it) on MTP states [M, H], chunk by chunk in
    float32 (`_FrozenHeadLogprobs`: one chunk of logits alive at a time)."""
    if states.dim() != 2 or head.dim() != 2 or states.shape[1] != head.shape[1]:
        raise ValueError(f"states [M, H] and head [V, H], got {states.shape} and {head.shape}")
    if states.shape[0] == 0:
        empty = states.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    head = head.detach()
    if torch.is_grad_enabled() and states.requires_grad:
        logp, hit = _FrozenHeadLogprobs.apply(states, head, targets, chunk_size)
        return logp, hit
    w = head.float()
    outs = [
        _chunk_stats(states[i : i + chunk_size].float(), w, targets[i : i + chunk_size], False)
        for i in range(0, states.shape[0], chunk_size)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
