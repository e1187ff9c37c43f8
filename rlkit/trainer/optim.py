"""AdamW and the learning-rate schedule (linear warmup, then constant / cosine / linear decay)."""

from __future__ import annotations

import math

import torch

from rlkit.config.schema import OptimConfig


def build_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `params`; fused=True (CUDA parameters) takes PyTorch's fused kernel, one
    launch for all of them, else the foreach implementation."""
    # No weight decay on norms and biases (1-D tensors), as is usual for transformers.
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, **impl
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
