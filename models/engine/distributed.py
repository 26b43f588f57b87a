"""One process, or one of several started by torchrun: who this process is, and the collectives a trainer
needs.

Every trainer goes through `init_distributed`, so a single process and a torchrun rank run the same code; with
one process the collectives are no-ops and the model is not wrapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.devices import resolve_device


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 writes the checkpoints, the log lines and the progress bar."""
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """One process, or one of WORLD_SIZE processes started by torchrun (NCCL on CUDA, Gloo on CPU)."""
    use_cuda = resolve_device(device) == "cuda"  # `cuda` without CUDA: DeviceError, one line
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, where)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """The model DDP averages the gradients of, or the model itself in one process."""
    if info.world == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
    )


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `values` over every rank, in place (the logged loss is the whole step's, not one
    shard's)."""
    if info.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (e.g. the RNG states a checkpoint keeps one of per rank)."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def one_process(device: str) -> DistInfo:
    """A trainer that never shards (GLoRIA: its contrastive batch must stay whole) is rank 0 of 1 on
    `device`."""
    return DistInfo(0, 1, 0, torch.device(resolve_device(device)))
