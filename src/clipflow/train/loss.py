"""Contrastive losses: `loss(image_features, text_features, logit_scale)`.

Each rank scores its own images against the texts of every rank and its own texts against
the images of every rank; features are gathered with gradients, the arrangement of
open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`.

`TiledClipLoss` computes exactly that loss without the (local x global) logit matrix: rows are
processed in tiles whose logits exist only inside one tile, in forward and again
(recomputed) in backward, and only each row's log-sum-exp is kept in between. Peak memory is
O(tile x global batch) instead of O(local batch x global batch).
"""

from __future__ import annotations

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

DEFAULT_TILE = 512


def build_loss(kind: str, rank: int, world_size: int) -> torch.nn.Module:
    """The training loss named by `train.loss`: `clip` (open_clip's ClipLoss) or `tiled`."""
    if kind == "tiled":
        return TiledClipLoss()
    if kind == "clip":
        return open_clip.ClipLoss(
            local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size
        )
    raise ValueError(f"unknown loss {kind!r}")


class TiledClipLoss(torch.nn.Module):
    """CLIP's symmetric InfoNCE over the global batch, in O(tile x B) memory.

    Matches `open_clip.ClipLoss(local_loss=True, gather_with_grad=True)` in value and in the
    gradients of the features and the logit scale; on one process it is plain `ClipLoss()`.
    """

    def __init__(self, tile: int = DEFAULT_TILE):
        super().__init__()
        self.tile = tile

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        local = image_features.shape[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * local
            all_images = torch.cat(dist_fn.all_gather(image_features))  # (B, d), gradients flow back
            all_texts = torch.cat(dist_fn.all_gather(text_features))
        else:
            offset, all_images, all_texts = 0, image_features, text_features
        image_to_text = _TiledInfoNCE.apply(image_features, all_texts, logit_scale, offset, self.tile)
        text_to_image = _TiledInfoNCE.apply(text_features, all_images, logit_scale, offset, self.tile)
        return (image_to_text + text_to_image) / (2 * local)


class _TiledInfoNCE(torch.autograd.Function):
    """sum_i [ logsumexp_j(s * a_i . c_j) - s * a_i . c_(offset + i) ] over the rows a_i.

    Computed in float32 whatever the input dtype; gradients are returned in the input dtypes.
    """

    @staticmethod
    def forward(ctx, rows, columns, logit_scale, offset: int, tile: int):
        a, c, scale = rows.float(), columns.float(), logit_scale.float()
        lse = torch.empty(a.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, a.shape[0], tile):
            logits = scale * (a[start : start + tile] @ c.T)  # (t, B): the only large buffer
            lse[start : start + tile] = torch.logsumexp(logits, dim=1)
        positives = scale * (a * c[offset : offset + a.shape[0]]).sum(dim=1)
        total = (lse - positives).sum()
        ctx.save_for_backward(rows, columns, logit_scale, lse)
        ctx.offset, ctx.tile = offset, tile
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows, columns, logit_scale, lse = ctx.saved_tensors
        a, c, scale = rows.float(), columns.float(), logit_scale.float()
        offset, tile, n = ctx.offset, ctx.tile, rows.shape[0]
        grad_a = torch.empty_like(a)
        grad_c = torch.zeros_like(c)
        grad_scale = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, n, tile):
            block = a[start : start + tile]
            similarity = block @ c.T  # (t, B), recomputed rather than kept from forward
            probabilities = torch.exp(scale * similarity - lse[start : start + tile, None])
            # d(lse_i)/d(logit_ij) = p_ij; the positive term is handled below, outside the tile.
            grad_scale += (probabilities * similarity).sum()
            grad_a[start : start + tile] = scale * (probabilities @ c)
            grad_c += scale * (probabilities.T @ block)
        paired = c[offset : offset + n]
        grad_a -= scale * paired
        grad_c[offset : offset + n] -= scale * a
        grad_scale -= (a * paired).sum()
        return (
            (grad_total * grad_a).to(rows.dtype),
            (grad_total * grad_c).to(columns.dtype),
            (grad_total * grad_scale).to(logit_scale.dtype),
            None,
            None,
        )
