"""Seeded mini-batch iteration over in-memory tensors, resumable at any step."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one epoch; the order depends only on (seed, epoch), so a resumed run skips
    ``start_batch`` batches and sees exactly what an uninterrupted run would have seen."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = labels.shape[0]
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    else:
        order = torch.arange(n)
    for start in range(start_batch * batch_size, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
