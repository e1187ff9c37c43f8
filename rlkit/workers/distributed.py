"""The learner ranks' torch.distributed plumbing: rendezvous, which micro-batches a rank
runs, and the collectives a data-parallel step needs (all PyTorch's own).

Every rank is given the whole rollout batch (one object-store ref) and runs its share of
each mini-batch's micro-batches: micro-batch j of a mini-batch goes to rank j % world. Each
micro-batch's loss is normalised by the whole mini-batch's token (or sequence) count, as in
one learner, so the gradients of the ranks *sum* to the one learner's gradient: they are
all-reduced with SUM, and every rank then takes the same optimizer step.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    """This process's place among the learner ranks (world 1: a lone learner, no collectives)."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes checkpoints and hands out the full weights."""
        return self.rank == 0

    def mine(self, count: int) -> list[int]:
        """Indices of the `count` micro-batches of a mini-batch that this rank runs."""
        return list(range(self.rank, count, self.world))

    def most(self, count: int) -> int:
        """Micro-batches the busiest rank runs: FSDP's ranks must all run this many forwards
        (each one gathers weights with the others), the idle ones on a zero-weighted copy."""
        return -(-count // self.world)


def rendezvous_address() -> str:
    """tcp://<this node's address>:<a free port> for `init_process_group`, picked on rank 0's
    node: the other ranks (other nodes too) connect to it."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


def join(address: str, rank: Rank, device: torch.device) -> None:
    """Join the process group of the learner ranks: gloo on a CPU, NCCL on a GPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        # Gloo picks the interface its hostname resolves to; on a loopback cluster (tests,
        # one machine) that may be an address the other ranks cannot reach: use the
        # rendezvous host's interface instead.
        host = address.removeprefix("tcp://").rsplit(":", 1)[0]
        if host.startswith("127."):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        backend, init_method=address, rank=rank.rank, world_size=rank.world,
        device_id=device if device.type == "cuda" else None,
    )  # fmt: skip


def all_true(flag: bool, rank: Rank, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one all-reduce MIN)."""
    if rank.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def sum_gradients(params: list[torch.nn.Parameter], rank: Rank) -> None:
    """Sum each parameter's gradient over the ranks, in place. A rank that ran no micro-batch
    of this mini-batch contributes zeros (every rank must join each all-reduce)."""
    if rank.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_tensor(t: torch.Tensor, rank: Rank) -> torch.Tensor:
    """`t` summed over the ranks (in place): rows each rank filled for its own share."""
    if rank.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: object, rank: Rank) -> list[object]:
    """`obj` of every rank, in rank order, on every rank (e.g. their RNG states)."""
    if rank.world == 1:
        return [obj]
    out: list[object] = [None] * rank.world
    dist.all_gather_object(out, obj)
    return out
