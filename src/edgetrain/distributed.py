"""Data-parallel training under ``torchrun`` with DistributedDataParallel (docs/user-guide.md).

``torchrun --nproc-per-node=N`` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK in the
environment; :func:`init_distributed` joins them (gloo on CPU, nccl on CUDA). Every rank draws the
same seeded global batch of B samples and keeps its share, samples ``rank, rank + N, ...`` (n_r of
them). Each rank's loss is ``(N / B) sum_{i in rank} CE_i``; DDP averages the gradients over the N
ranks, so the gradient is ``(1 / B) sum_i dCE_i``: the gradient of a single process on the whole
batch, for any split of B. DDP broadcasts rank 0's parameters and buffers at the start (and the
buffers before every forward), and every rank applies the same averaged gradient with the same
optimizer state, so weights and thresholds stay identical on every rank. Rank 0 alone writes
checkpoints and prints; every rank can resume from them.

Batch-norm statistics in training mode are those of each rank's share (as in DDP without
SyncBatchNorm); with ``bn_stat_epochs = 0`` (frozen statistics) the result equals the single-process
run on the same global batch up to the order of floating-point sums.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

DEVICES = ("cpu", "cuda")


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 of a process group (or RANK unset / 0 in the environment), the one that writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, or ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun), or an explicit torch device."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device; use device='cpu'")
        if device == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def init_distributed(device: str | torch.device = "cpu") -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 and none is open (nccl for CUDA, gloo
    otherwise). Returns True when this call opened it (then :func:`close_distributed` it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(resolve_device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def close_distributed() -> None:
    """Wait for every rank, then leave the process group (gloo may abort at exit without the barrier)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when a process group of more than one rank is open."""
    if world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def rank_share(
    images: torch.Tensor, labels: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``rank, rank + world_size, ...`` of a global batch."""
    return images[rank::world_size], labels[rank::world_size]


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over every rank (the tensor itself outside a process group)."""
    if world()[1] == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total
