"""The multi-token-prediction (MTP) module: MTP-RL's drafter (ALGORITHMS.md section 4).

One transformer block of the trunk's architecture, applied recursively (the same parameters
at every depth), on top of the trunk's final hidden states, with the trunk's embedding and LM
head:

    x_k = proj([hnorm(g_{k-1}); enorm(embed(token_{t+k}))])    g_0 = h_t, the trunk's state
    g_k = block(x_k)                                           at position t + k - 1
    logits_k = lm_head(norm(g_k))                              predicts token_{t+k+1}

The block attends causally over its own states of the completion so far: during drafting
(`rlkit.rollout.drafters.MTPDrafter`) its keys and values live in a one-layer KV cache that
holds, for every position i already verified, the depth-1 state of the pair (h_i, token_{i+1});
depth k >= 2 of a draft adds one entry per depth on top (removed again after drafting).
`forward_train` reproduces exactly that in one pass per depth for teacher-forced training: the
depth-k query at row j sees the depth-1 entries of rows <= j and the depth-2..k entries of row
j itself. The attention starts at the completion's first state (the last prompt position), so
training needs only the hidden states the learner computes anyway.

Saved beside a Hugging Face checkpoint as `mtp.safetensors` (names `mtp.*`), so that
`AutoModelForCausalLM` still loads the trunk from `model.safetensors` and ignores it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder, DecoderLayer, RMSNorm

MTP_FILE = "mtp.safetensors"
PREFIX = "mtp."


class MTPModule(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.hnorm = RMSNorm(h, args.rms_norm_eps)
        self.enorm = RMSNorm(h, args.rms_norm_eps)
        self.proj = nn.Linear(2 * h, h, bias=False)
        # Layer index 0: the block's attention asks its cache for layer 0.
        self.block = DecoderLayer(args, 0)
        self.norm = RMSNorm(h, args.rms_norm_eps)

    def step_input(self, h: torch.Tensor, tokens: torch.Tensor, trunk: Decoder) -> torch.Tensor:
        """x [..., H] from the previous state h [..., H] and the next tokens [...]. The trunk's
        embedding is frozen for the MTP loss (read detached)."""
        e = F.embedding(tokens, trunk.model.embed_tokens.weight.detach())
        return self.proj(torch.cat([self.hnorm(h), self.enorm(e.to(h.dtype))], dim=-1))

    def run_block(
        self, x: torch.Tensor, positions: torch.Tensor, trunk: Decoder, cache: Any
    ) -> torch.Tensor:
        """The shared block on x [B, T, H] at true positions [B, T]; `cache` stores its keys
        and values and attends (`rlkit.models.decoder.AttentionCache`)."""
        cos, sin = trunk.rope(positions, x.dtype)
        return self.block(x, cos, sin, cache)

    def forward_train(
        self,
        trunk: Decoder,
        hidden: torch.Tensor,  # [N, R, H] row j: the trunk's state that predicts token j
        tokens: torch.Tensor,  # [N, R] completion tokens
        start: torch.Tensor,  # [N] true position of row 0 (prompt length - 1)
        depth: int,
    ) -> list[torch.Tensor]:
        """Teacher-forced states of every depth, each [N, R, H] after `norm` (ready for the LM
        head): entry k - 1, row j predicts token j + k. Rows past a completion are padding."""
        N, R, _ = hidden.shape
        steps = torch.arange(R, device=hidden.device)
        attn = _DepthAttention()
        g, out = hidden, []
        for k in range(1, depth + 1):
            # Row j of depth k feeds token j + k - 1 at position start + j + k - 1.
            nxt = F.pad(tokens[:, k - 1 :], (0, k - 1))  # [N, R]
            positions = start[:, None] + steps[None, :] + (k - 1)
            g = self.run_block(self.step_input(g, nxt, trunk), positions, trunk, attn)
            out.append(self.norm(g))
        return out


class _DepthAttention:
    """Attention of `forward_train`: depth 1 is causal over its rows; the depth-k query at row
    j also sees the depth-2..k entries of row j (what a draft's cache holds at that point)."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k.append(k)  # [N, KVH, R, D]
        self.v.append(v)
        R = q.shape[2]
        j = torch.arange(R, device=q.device)
        causal = j[None, :] <= j[:, None]  # [R, R]
        same = j[None, :] == j[:, None]
        mask = torch.cat([causal] + [same] * (len(self.k) - 1), dim=1)  # [R, depth * R]
        keys, values = torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def wanted(cfg: Any) -> bool:
    """Whether a run (a RecipeConfig) has an MTP module: it drafts with one, or warms one up."""
    drafter = cfg.rollout.speculative.drafter
    return drafter in ("mtp", "sam+mtp") or any(s.type == "mtp_warmup" for s in cfg.stages)


def init_mtp(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> MTPModule:
    """A fresh module with Hugging Face's initialisation (normal, std 0.02; norms at 1), the
    same on every process for a seed (drawn on the CPU)."""
    module = MTPModule(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.to(dtype)


def mtp_state(module: MTPModule) -> dict[str, torch.Tensor]:
    """The module's parameters under their checkpoint names (`mtp.*`)."""
    return {PREFIX + k: v for k, v in module.state_dict().items()}


def load_mtp_state(module: MTPModule, state: dict[str, torch.Tensor]) -> None:
    """Copy `mtp.*` entries of `state` into `module` in place (cast to its dtype); every
    parameter must be there, and nothing else under the prefix."""
    own = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    try:
        missing, unexpected = module.load_state_dict(own, strict=False)
    except RuntimeError as e:  # a shape mismatch: another model's module
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"MTP weights do not match the module: {lines[:1] or str(e)}") from None
    if missing or unexpected:
        raise ValueError(
            f"MTP weights do not match the module: missing {missing}, unexpected {unexpected}"
        )


def save_mtp(module: MTPModule, model_dir: str) -> str:
    """Write `model_dir/mtp.safetensors`; returns its path."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, MTP_FILE)
    state = {k: v.detach().to("cpu").contiguous() for k, v in mtp_state(module).items()}
    save_file(state, path, metadata={"format": "pt", "rlkit": "mtp"})
    return path


def load_mtp(
    model_dir: str, args: ModelArgs, dtype: torch.dtype = torch.float32
) -> MTPModule | None:
    """The module saved beside the checkpoint in `model_dir`, or None when there is none."""
    path = os.path.join(model_dir, MTP_FILE)
    if not os.path.isfile(path):
        return None
    module = MTPModule(args)
    try:
        load_mtp_state(module, load_file(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return module.to(dtype)
