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
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    jacobian: bool,
    teacher: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one chunk of float32 rows h [C, H] and head w [V, H], q = softmax(h w^T): the
    score [C] (log q(target); with `teacher` rows [C, H], sum_v p_v log q_v where p =
    softmax(teacher w^T / temperature)), top-1 hits [C] against `targets` and, with
    `jacobian`, d score / d h [C, H] = (onehot(target) or p) w - q w."""
    z = h @ w.T  # [C, V]
    lse = torch.logsumexp(z, dim=-1)
    hit = z.argmax(dim=-1) == targets
    p = None
    if teacher is None:
        score = z.gather(-1, targets[:, None])[:, 0] - lse
    else:
        p = torch.softmax((teacher @ w.T).div_(temperature), dim=-1)
        score = (p * z).sum(-1) - lse
    if not jacobian:
        return score, hit, None
    q = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory
    pulled = w[targets] if p is None else p @ w
    return score, hit, pulled - q @ w


def _chunked_stats(
    states: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    jacobian: bool,
    teacher: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_chunk_stats` over all rows, `chunk` at a time in float32, the chunks' outputs
    concatenated (d score / d h only with `jacobian`)."""
    scores, hits, jacs = [], [], []
    for i in range(0, states.shape[0], chunk):
        h = states[i : i + chunk].float()
        t = None if teacher is None else teacher[i : i + chunk].float()
        score, hit, jac = _chunk_stats(h, w, targets[i : i + chunk], jacobian, t, temperature)
        scores.append(score)
        hits.append(hit)
        if jac is not None:
            jacs.append(jac)
    return torch.cat(scores), torch.cat(hits), torch.cat(jacs) if jacobian else None


class _FrozenHeadScores(torch.autograd.Function):
    """`_chunk_stats`' scores under a frozen LM head, with their gradient in the states
    computed in the forward pass: the backward only scales each row's d score / d h by its
    incoming gradient. Each chunk's logits are computed once and the head is read twice
    (logits, q w; a teacher's distribution once more), where checkpointing a chunk computed
    its logits twice and read the head three times."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        states: torch.Tensor,
        head: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        teacher: torch.Tensor | None,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores, hits, jac = _chunked_stats(
            states, head.float(), targets, chunk, True, teacher, temperature
        )
        assert jac is not None
        ctx.save_for_backward(jac)
        ctx.states_dtype = states.dtype
        ctx.mark_non_differentiable(hits)
        return scores, hits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_score: torch.Tensor, g_hit: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        (jac,) = ctx.saved_tensors
        return (g_score[:, None] * jac).to(ctx.states_dtype), None, None, None, None, None


def mtp_token_stats(
    states: torch.Tensor,
    head: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    teacher: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [M] (differentiable in states) and top-1 hits [M] bool of the LM head `head`
    [V, H] (frozen: no gradient reaches it) on MTP states [M, H], chunk by chunk in float32
    (`_FrozenHeadScores`: one chunk of logits alive at a time). The score is log q(target);
    with `teacher` [M, H] (the trunk's states at the targets' positions, read without
    gradient) it is sum_v p_v log q_v against the trunk's own distribution p at `temperature`
    (minus the soft cross-entropy: self-distillation on the policy's distribution, not on the
    one token it sampled)."""
    if states.dim() != 2 or head.dim() != 2 or states.shape[1] != head.shape[1]:
        raise ValueError(f"states [M, H] and head [V, H], got {states.shape} and {head.shape}")
    if teacher is not None and teacher.shape != states.shape:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} differs from states {tuple(states.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if states.shape[0] == 0:
        empty = states.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    head = head.detach()
    teacher = None if teacher is None else teacher.detach()
    if torch.is_grad_enabled() and states.requires_grad:
        score, hit = _FrozenHeadScores.apply(
            states, head, targets, chunk_size, teacher, temperature
        )
        return score, hit
    with torch.no_grad():
        score, hit, _ = _chunked_stats(
            states, head.float(), targets, chunk_size, False, teacher, temperature
        )
    return score, hit
