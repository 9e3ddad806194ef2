"""Contrastive losses.

Each rank scores its own images and texts against the features of every rank (gathered with
gradients), the arrangement open_clip uses for data-parallel CLIP training.
"""

from __future__ import annotations

import open_clip
import torch


def clip_loss(rank: int, world_size: int) -> torch.nn.Module:
    """The symmetric InfoNCE loss of CLIP over the global batch: `loss(img, txt, logit_scale)`."""
    return open_clip.ClipLoss(
        local_loss=world_size > 1,
        gather_with_grad=world_size > 1,
        rank=rank,
        world_size=world_size,
    )
