"""Training batches from shards: a deterministic global order, split across ranks.

Step `s` of a run always sees the same samples, whatever the number of processes: the
global batch is a slice of a seeded per-epoch permutation, and rank `r` takes the r-th
contiguous part of it. That makes runs reproducible and a resume exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from clipflow.data.pairs import ShardPairs


def global_batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sample indices of global step `step` (0-based); the last partial batch of an epoch is dropped."""
    steps_per_epoch = num_samples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training samples")
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size]


def rank_batches(
    dataset: ShardPairs, batch_size: int, seed: int, rank: int, world_size: int, start_step: int, steps: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's part of global batches `start_step .. steps-1`."""
    per_rank = batch_size // world_size
    for step in range(start_step, steps):
        indices = global_batch_indices(len(dataset), batch_size, step, seed)[rank * per_rank : (rank + 1) * per_rank]
        items = [dataset[int(i)] for i in indices]
        yield torch.stack([image for image, _ in items]), torch.stack([tokens for _, tokens in items])
