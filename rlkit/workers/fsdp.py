"""FSDP2 for the learner ranks (`train.shard: true`): PyTorch's `fully_shard`, each decoder
layer a unit and the root (embedding, final norm, LM head) one more, so a layer's weights are
gathered for its forward and backward only; gradients are reduce-scattered and the optimizer
states live with each rank's shard.

Full weights leave the ranks in two places, both through `DTensor.full_tensor` (an
all-gather per tensor, every rank in the same order): the rollout sync and the checkpoint's
Hugging Face model, both written by rank 0. The optimizer states stay sharded on disk too:
`torch.distributed.checkpoint` writes each rank's shards to `optimizer/` and reads them back
resharded for any number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from rlkit.models.decoder import Decoder


def shard(model: Decoder, compute_dtype: torch.dtype) -> None:
    """Shard `model` (float32 parameters) in place; with a lower compute dtype FSDP's mixed
    precision gathers the layers in it and reduces gradients in float32 (the sharded float32
    parameters are the master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def grad_scale(world: int) -> float:
    """What each rank's loss is multiplied by before backward: FSDP2 averages the ranks'
    gradients, and each rank's loss is already normalised by the whole batch's token count, so
    the one-learner update is their sum (N x the average; exact for a power of two). A divide
    factor of 1 would say the same but needs PREMUL_SUM, which gloo lacks."""
    return float(world)


def full_tensors(
    state: dict[str, torch.Tensor], keep: bool
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full tensor) per entry, one at a time (every rank must iterate all of them, in
    order: each sharded tensor is one all-gather); `keep` False (ranks > 0) yields None after
    the gather, so only rank 0 ever holds more than one full tensor."""
    for name, value in state.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        yield name, (full if keep else None)


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm that `clip_grad_norm_` returned over sharded gradients (a DTensor)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def save_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    """Every rank's optimizer shards into `path/optimizer/` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(path, "optimizer"))


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    """The optimizer shards of `path/optimizer/` into `opt`, resharded for this many ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(path, "optimizer"))
    set_optimizer_state_dict(model, opt, state["optimizer"])


def load_full(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """A full (unsharded) state dict into the sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))  # type: ignore[arg-type]
