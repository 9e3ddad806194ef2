"""This process's place among the job's processes: rank, leader, device, and the few collectives the loop uses.

Without torchrun's environment (WORLD_SIZE unset) the process trains alone and every collective
is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process in the job.

    Attributes:
        rank, world_size: the global rank and the number of processes.
        leader: the global rank of the process that writes checkpoints and logs: local rank 0 of node 0.
        device: this process's GPU (by local rank), or the CPU.
        distributed: whether a process group is up (torchrun started this process).
    """

    rank: int
    world_size: int
    leader: int
    device: torch.device
    distributed: bool

    @property
    def leads(self) -> bool:
        return self.rank == self.leader

    def agree(self, value: Any) -> Any:
        """`value` as the leader has it, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=self.leader)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (reduced in place)."""
        if self.distributed:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """The number of this job's processes on this node (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def join(node_rank: int) -> Group:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on the CPU), if any.

    Args:
        node_rank: this node's rank; local rank 0 of node 0 leads.
    """
    distributed = "WORLD_SIZE" in os.environ
    device = torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not distributed:
        return Group(rank=0, world_size=1, leader=0, device=device, distributed=False)
    # torchrun keeps one store across restarts; a restarted group that read the dead attempt's
    # keys (gloo peer addresses) failed to connect or hung here. Each attempt gets its own keys.
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.PrefixStore(f"clipflow/attempt-{attempt}", store),
        rank=rank,
        world_size=world_size,
    )
    # c10d assigns global ranks in an order unrelated to node ranks: the leader says who it is.
    is_leader = node_rank == 0 and local_rank() == 0
    flag = torch.tensor([dist.get_rank() if is_leader else 0], device=device)
    dist.all_reduce(flag)
    return Group(
        rank=dist.get_rank(), world_size=dist.get_world_size(), leader=int(flag.item()), device=device, distributed=True
    )


def leave(group: Group) -> None:
    """Wait for every rank to finish, then take the process group down."""
    if group.distributed:
        dist.barrier()
        dist.destroy_process_group()
