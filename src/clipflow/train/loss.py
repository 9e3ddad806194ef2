"""Contrastive losses: `loss(image_features, text_features, logit_scale, logit_bias=None)`.

`TiledClipLoss` is CLIP's symmetric InfoNCE, exactly as open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)` computes it, without ever holding a
(local x global) logit matrix. `TiledSigLipLoss` is SigLIP's sigmoid loss, exactly as
open_clip's `SigLipLoss` computes it, in the same tiles.

How the InfoNCE loss stays cheap:

- One pass over the similarity matrix serves both directions. Each rank computes only its own
  rows (its images against the texts of every rank), in tiles of rows; the image-to-text
  direction needs each row's log-sum-exp, the text-to-image direction each column's, and the
  column statistics are merged across tiles with a running maximum and across ranks with two
  all-reduces of B floats. Images are never gathered.
- Forward keeps only the row and column log-sum-exps; backward recomputes each tile. That is
  four (tile x B x d) matrix products per tile in all, forward and backward, where open_clip
  needs six over the full matrices, and the elementwise work runs in place in two (one
  process) or three (several) preallocated tile buffers, so no B x B temporary is ever allocated.
- Arithmetic is float32 whatever the input dtype; gradients return in the input dtypes.

Each rank's loss value, and its gradients of the features (through the gather) and of the
logit scale, equal open_clip's on that rank.
"""

from __future__ import annotations

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from clipflow.params import TRAIN_LOSSES

DEFAULT_TILE = 512


def build_loss(kind: str, rank: int, world_size: int) -> torch.nn.Module:
    """The training loss named by `train.loss`: `clip` (open_clip's ClipLoss), `tiled` or `siglip`."""
    if kind == "tiled":
        return TiledClipLoss()
    if kind == "siglip":
        return TiledSigLipLoss()
    if kind == "clip":
        return open_clip.ClipLoss(
            local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size
        )
    raise ValueError(f"unknown loss {kind!r}, expected one of {TRAIN_LOSSES}")


def _gather_texts(text_features: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """The texts of every rank (gradients flow back to their owners), this rank's row offset, distributed?"""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * text_features.shape[0]
        return torch.cat(dist_fn.all_gather(text_features)), offset, True
    return text_features, 0, False


class _TiledLoss(torch.nn.Module):
    """A loss over this rank's images against every rank's texts, `tile` rows of logits at a time."""

    def __init__(self, tile: int = DEFAULT_TILE):
        super().__init__()
        self.tile = tile

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        all_texts, offset, distributed = _gather_texts(text_features)
        return self._apply(image_features, all_texts, logit_scale, logit_bias, offset, distributed)


class TiledClipLoss(_TiledLoss):
    """CLIP's symmetric InfoNCE over the global batch, in O(tile x B) memory."""

    def _apply(self, images, all_texts, logit_scale, logit_bias, offset, distributed):
        # A bias shifts every logit of a softmax alike: it changes neither the loss nor any gradient.
        return _TiledInfoNCE.apply(images, all_texts, logit_scale, offset, self.tile, distributed)


class TiledSigLipLoss(_TiledLoss):
    """SigLIP: -sum log sigmoid(+-(scale * a.c + bias)) / local batch, in O(tile x B) memory."""

    def _apply(self, images, all_texts, logit_scale, logit_bias, offset, distributed):
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs the model's logit_bias (create the model with init_logit_bias)")
        return _TiledSigmoid.apply(images, all_texts, logit_scale, logit_bias, offset, self.tile)


def _row_tiles(rows: torch.Tensor, tile: int):
    for start in range(0, rows.shape[0], tile):
        yield slice(start, start + tile), rows[start : start + tile]


class _TiledInfoNCE(torch.autograd.Function):
    """This rank's open_clip loss: [sum over own images of (lse_row - positive)
    + sum over own texts of (lse_column - positive)] / (2 x local batch), where a column's
    log-sum-exp runs over the images of every rank.
    """

    @staticmethod
    def forward(ctx, images, all_texts, logit_scale, offset: int, tile: int, distributed: bool):
        a, c, scale = images.float(), all_texts.float(), logit_scale.float()
        local, width = a.shape[0], c.shape[0]
        logits = a.new_empty(min(tile, local), width)
        shifted = torch.empty_like(logits)
        row_lse = a.new_empty(local)
        column_max = a.new_full((width,), float("-inf"))
        column_sum = a.new_zeros(width)
        scaled_rows = scale * a  # folding the scale into the rows spares a pass over every tile
        for rows_at, rows in _row_tiles(scaled_rows, tile):
            block, scratch = logits[: rows.shape[0]], shifted[: rows.shape[0]]
            torch.mm(rows, c.T, out=block)
            row_max = block.amax(dim=1)
            torch.sub(block, row_max[:, None], out=scratch)
            row_lse[rows_at] = scratch.exp_().sum(dim=1).log_() + row_max
            merged_max = torch.maximum(column_max, block.amax(dim=0))
            column_sum.mul_(torch.exp(column_max - merged_max))
            column_sum += block.sub_(merged_max).exp_().sum(dim=0)
            column_max = merged_max
        if distributed:
            rank_max = column_max.clone()
            dist.all_reduce(column_max, op=dist.ReduceOp.MAX)
            column_sum.mul_(torch.exp(rank_max - column_max))
            dist.all_reduce(column_sum)
        column_lse = column_sum.log_() + column_max
        positives = scale * (a * c[offset : offset + local]).sum(dim=1)
        total = (row_lse - positives).sum() + (column_lse[offset : offset + local] - positives).sum()
        ctx.save_for_backward(images, all_texts, logit_scale, row_lse, column_lse)
        ctx.offset, ctx.tile, ctx.distributed = offset, tile, distributed
        return total / (2 * local)

    @staticmethod
    def backward(ctx, grad_loss):
        images, all_texts, logit_scale, row_lse, column_lse = ctx.saved_tensors
        a, c, scale = images.float(), all_texts.float(), logit_scale.float()
        offset, local = ctx.offset, a.shape[0]
        grad_loss = grad_loss.float()
        lse = (row_lse, column_lse)
        if ctx.distributed:
            grad_a, grad_c, scale_term = _rank_logit_grads(a, c, scale, lse, grad_loss, offset, ctx.tile)
        else:
            grad_a, grad_c, scale_term = _logit_grads(a, c, scale, lse, grad_loss, ctx.tile)
        own_columns = slice(offset, offset + local)
        paired = c[own_columns]
        norm = 1.0 / (2 * local)
        # Each positive logit appears in both directions, hence the factors of 2.
        grad_a.sub_(2 * grad_loss * paired).mul_(scale * norm)
        grad_c.mul_(scale * norm)
        grad_c[own_columns] -= (2 * norm * scale * grad_loss) * a
        grad_scale = norm * (scale_term - 2 * grad_loss * (a * paired).sum())
        return grad_a.to(images.dtype), grad_c.to(all_texts.dtype), grad_scale.to(logit_scale.dtype), None, None, None


def _logit_grads(a, c, scale, lse, grad_loss, tile):
    """One process: G = p_row + p_col over the whole matrix; returns grad_loss x (G c, G^T a, sum G * a c^T).

    The last, the logit scale's term, comes free from the first: sum_ij G_ij a_i.c_j = sum_i a_i.(G c)_i.
    """
    row_lse, column_lse = lse
    logits = a.new_empty(min(tile, a.shape[0]), c.shape[0])
    weights = torch.empty_like(logits)
    grad_a, grad_c = torch.empty_like(a), torch.zeros_like(c)
    for rows_at, rows in _row_tiles(scale * a, tile):
        block, g = logits[: rows.shape[0]], weights[: rows.shape[0]]
        torch.mm(rows, c.T, out=block)
        torch.sub(block, row_lse[rows_at, None], out=g).exp_()
        g.add_(block.sub_(column_lse).exp_())
        torch.mm(g, c, out=grad_a[rows_at])
        grad_c.addmm_(g.T, a[rows_at])
    scale_term = grad_loss * (a * grad_a).sum()
    return grad_a.mul_(grad_loss), grad_c.mul_(grad_loss), scale_term


def _rank_logit_grads(a, c, scale, lse, grad_loss, offset, tile):
    """`_logit_grads` for this rank's rows, with each column weighted by the upstream gradient of the
    rank that owns its text; the logit scale's term is this rank's own loss's alone, as in open_clip,
    so the column part of it sums over every rank's rows.
    """
    row_lse, column_lse = lse
    local, width = a.shape[0], c.shape[0]
    upstream = [torch.empty_like(grad_loss) for _ in range(dist.get_world_size())]
    dist.all_gather(upstream, grad_loss.contiguous())
    column_weight = torch.stack(upstream).repeat_interleave(local)
    logits = a.new_empty(min(tile, local), width)
    row_probs, column_probs = torch.empty_like(logits), torch.empty_like(logits)
    grad_a, grad_c = torch.empty_like(a), torch.zeros_like(c)
    row_expectation = a.new_zeros(())  # sum_ij p_row_ij logit_ij
    column_expectation = a.new_zeros(width)  # sum_i p_col_ij logit_ij, this rank's rows
    for rows_at, rows in _row_tiles(scale * a, tile):
        count = rows.shape[0]
        block, p_row, p_col = logits[:count], row_probs[:count], column_probs[:count]
        torch.mm(rows, c.T, out=block)
        torch.sub(block, row_lse[rows_at, None], out=p_row).exp_()
        torch.sub(block, column_lse, out=p_col).exp_()
        row_expectation += torch.dot(p_row.view(-1), block.view(-1))
        column_expectation += block.mul_(p_col).sum(dim=0)
        p_row.mul_(grad_loss).add_(p_col.mul_(column_weight))
        torch.mm(p_row, c, out=grad_a[rows_at])
        grad_c.addmm_(p_row.T, a[rows_at])
    dist.all_reduce(column_expectation)
    own = column_expectation[offset : offset + local].sum()
    return grad_a, grad_c, grad_loss * (row_expectation + own) / scale


class _TiledSigmoid(torch.autograd.Function):
    """open_clip's SigLipLoss on this rank: its images against every rank's texts, the pair of
    each image positive and all else negative: [sum_ij softplus(l_ij) - sum_i l_ii] / local, as
    -log sigmoid(-l) = softplus(l) and -log sigmoid(l) = softplus(l) - l.
    """

    @staticmethod
    def forward(ctx, images, all_texts, logit_scale, logit_bias, offset: int, tile: int):
        a, c, scale, bias = images.float(), all_texts.float(), logit_scale.float(), logit_bias.float()
        local, width = a.shape[0], c.shape[0]
        logits = a.new_empty(min(tile, local), width)
        scratch = torch.empty_like(logits)
        total = a.new_zeros(())
        for _, rows in _row_tiles(scale * a, tile):
            block, softplus_tail = logits[: rows.shape[0]], scratch[: rows.shape[0]]
            torch.addmm(bias, rows, c.T, out=block)
            # softplus(l) = max(l, 0) + log1p(exp(-|l|)), stable for any l, in place.
            torch.abs(block, out=softplus_tail).neg_().exp_().log1p_()
            total += softplus_tail.sum() + block.clamp_(min=0).sum()
        positives = scale * (a * c[offset : offset + local]).sum(dim=1) + bias
        ctx.save_for_backward(images, all_texts, logit_scale, logit_bias)
        ctx.offset, ctx.tile = offset, tile
        return (total - positives.sum()) / local

    @staticmethod
    def backward(ctx, grad_loss):
        images, all_texts, logit_scale, logit_bias = ctx.saved_tensors
        a, c, scale, bias = images.float(), all_texts.float(), logit_scale.float(), logit_bias.float()
        local, width = a.shape[0], c.shape[0]
        logits = a.new_empty(min(ctx.tile, local), width)
        probs = torch.empty_like(logits)
        grad_a, grad_c = torch.empty_like(a), torch.zeros_like(c)
        logit_expectation, prob_sum = a.new_zeros(()), a.new_zeros(())
        for rows_at, rows in _row_tiles(scale * a, ctx.tile):
            block, p = logits[: rows.shape[0]], probs[: rows.shape[0]]
            torch.addmm(bias, rows, c.T, out=block)
            torch.sigmoid(block, out=p)  # d softplus(l) / dl
            logit_expectation += torch.dot(p.view(-1), block.view(-1))
            prob_sum += p.sum()
            torch.mm(p, c, out=grad_a[rows_at])
            grad_c.addmm_(p.T, a[rows_at])
        paired = c[ctx.offset : ctx.offset + local]
        coefficient = grad_loss.float() / local
        grad_a.sub_(paired).mul_(coefficient * scale)
        grad_c.mul_(coefficient * scale)
        grad_c[ctx.offset : ctx.offset + local] -= (coefficient * scale) * a
        # l = scale * s + bias, so sum p * s = (sum p * l - bias * sum p) / scale.
        grad_scale = coefficient * ((logit_expectation - bias * prob_sum) / scale - (a * paired).sum())
        grad_bias = coefficient * (prob_sum - local)
        return (
            grad_a.to(images.dtype),
            grad_c.to(all_texts.dtype),
            grad_scale.to(logit_scale.dtype),
            grad_bias.to(logit_bias.dtype),
            None,
            None,
        )
