"""Mixed precision without autocast: the model computes in bf16, the optimizer updates fp32.

Autocast re-casts every weight at every matmul of every forward and backward; on a CPU that
cast is a quarter of a learner step. Keeping the model's parameters in bf16 and a float32
master copy for the optimizer (as FSDP's mixed precision does) casts once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _groups(pairs: list[Any], numel: int) -> list[list[Any]]:
    """Consecutive (parameter, master) pairs in groups of about `numel` elements (a larger
    parameter is a group of its own)."""
    out: list[list[Any]] = [[]]
    size = 0
    for pair in pairs:
        if out[-1] and size + pair[0].numel() > numel:
            out.append([])
            size = 0
        out[-1].append(pair)
        size += pair[0].numel()
    return out if out[-1] else []


class MasterWeights:
    # Elements per group of float32 gradients in a multi-tensor step (128 MB of them).
    group_numel = 32 << 20

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
        """`model` holds the full-precision weights; it is cast to `compute_dtype` in place."""
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.master = [
            torch.nn.Parameter(p.detach().float().clone())
            for p in model.parameters()
            if p.requires_grad
        ]
        model.to(compute_dtype)
        self.model_params = [p for p in model.parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.master

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def step(
        self, opt: torch.optim.Optimizer, max_norm: float, one_at_a_time: bool = True
    ) -> float:
        """Clip and step; returns the gradient norm before clipping (a non-finite norm: nothing
        is stepped, the gradients are dropped). Same update as grads_to_master +
        clip_grad_norm_ + opt.step() + master_to_model.

        one_at_a_time (a CPU's memory): only one float32 gradient exists at a time (all of them
        at once are 4 bytes per parameter, 540 MB for a 135M model). Otherwise (a GPU) the
        gradients are cast a group of about `group_numel` elements at a time and the optimizer
        steps each group in one call, so a fused optimizer launches a handful of kernels per
        group instead of a few per parameter, and the float32 copies held at once stay near
        4 x group_numel bytes (a fifth of a 135M model's, not all of them). The norm is
        taken from the compute-dtype grads in float32, which equals the norm of their float32
        copies.
        """
        grads = [p.grad for p in self.model_params if p.grad is not None]
        if not grads:
            return 0.0
        # One multi-tensor norm, not one launch per gradient (hundreds on a GPU).
        norm = torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm(grads, dtype=torch.float32))
        )
        norm_value = float(norm)  # the step's one device sync
        if not math.isfinite(norm_value):
            # A NaN or inf gradient would poison every weight it reaches: no update at all.
            for p in self.model_params:
                p.grad = None
            return norm_value
        coef_t = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if not one_at_a_time:
            pairs = [(p, m) for p, m in zip(self.model_params, self.master) if p.grad is not None]
            for group in _groups(pairs, self.group_numel):
                master_grads = []
                for p, m in group:
                    g = p.grad.float()  # type: ignore[union-attr]
                    m.grad, p.grad = g, None
                    master_grads.append(g)
                torch._foreach_mul_(master_grads, coef_t)
                opt.step()  # steps exactly the parameters with a gradient: this group's
                for _, m in group:
                    m.grad = None
                torch._foreach_copy_([p for p, _ in group], [m for _, m in group])
            return norm_value
        coef = float(coef_t)
        for p, m in zip(self.model_params, self.master):
            if p.grad is None:
                continue
            m.grad = p.grad.float()
            p.grad = None
            if coef < 1.0:
                m.grad.mul_(coef)
            # The optimizer steps exactly the parameters that have a gradient: this one.
            opt.step()
            m.grad = None
            p.copy_(m)
        return norm_value

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.master):
            p.copy_(m)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with float32 master values in place of the bf16 parameters."""
        master = dict(zip(self.names, self.master))
        return {k: master[k].detach() if k in master else v for k, v in model.state_dict().items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in zip(self.names, self.master):
            m.copy_(state[name])
        self.master_to_model()


class StateView:
    """What `save_pretrained` reads from a model (its args and state dict), with other values."""

    def __init__(self, args: Any, state: dict[str, torch.Tensor]) -> None:
        self.args = args
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state
