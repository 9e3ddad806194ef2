"""One optimizer step: forward and backward over `accum_freq` micro-batches, then the update."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

MAX_LOGIT_SCALE = math.log(100.0)


def precision_context(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context of a resolved `train.precision` (bf16 or fp32) on `device`."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def optimizer_step(
    model: torch.nn.Module,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    accum_freq: int,
    autocast: AbstractContextManager,
) -> torch.Tensor:
    """Train on one batch: gradients of its loss (see `backward`), an AdamW update, the schedule's next rate.

    Args:
        model: the model the batch goes through, DDP-wrapped or not.
        module: the bare model under it, whose logit scale is kept within [0, log 100].
        optimizer, scheduler: stepped once.
        loss_fn, images, tokens, accum_freq, autocast: as `backward` takes them.

    Returns:
        The (detached) loss of the batch.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = backward(model, loss_fn, images, tokens, accum_freq, autocast)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss


def backward(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    accum_freq: int,
    autocast: AbstractContextManager,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of the contrastive loss of this rank's whole batch.

    With `accum_freq` > 1 the batch goes through the model in that many micro-batches, the way
    open_clip's `--accum-freq` does it: first every micro-batch's features without gradients,
    then each micro-batch again with gradients, its live features placed among the cached
    features of the others. Each pass's loss is the full batch's loss, so every pair still meets
    every negative, and the passes' parameter gradients add up to the full-batch gradient:
    activation memory is one micro-batch's. The logit scale (and bias) take their gradient in one
    pass only (open_clip counts it accum_freq times); under DDP that pass is the synchronised last one.

    Args:
        model: the model, DDP-wrapped or not; `model(images, tokens)` returns features then scale(s).
        loss_fn: `loss_fn(image_features, text_features, *scales)`.
        images, tokens: this rank's part of the global batch.
        accum_freq: micro-batches; must divide the batch.
        autocast: the precision context.

    Returns:
        The (detached) loss of the batch.
    """
    # The kernel choice must hold in backward too: gradient checkpointing recomputes attention there.
    with _attention_kernels():
        if accum_freq == 1:
            with autocast:
                image_features, text_features, *scales = model(images, tokens)
                loss = loss_fn(image_features, text_features, *scales)
            loss.backward()
            return loss.detach()

        image_chunks, token_chunks = images.chunk(accum_freq), tokens.chunk(accum_freq)
        with torch.no_grad(), autocast:
            cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks, strict=True)]
        for j, (chunk_images, chunk_tokens) in enumerate(zip(image_chunks, token_chunks, strict=True)):
            last = j == accum_freq - 1
            # Gradients sum locally until the last pass, whose backward all-reduces them once.
            sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
            with sync:
                with autocast:
                    image_features, text_features, *scales = model(chunk_images, chunk_tokens)
                    if not last:
                        scales = [scale.detach() for scale in scales]
                    others_before, others_after = cached[:j], cached[j + 1 :]
                    all_images = torch.cat(
                        [c[0] for c in others_before] + [image_features] + [c[0] for c in others_after]
                    )
                    all_texts = torch.cat(
                        [c[1] for c in others_before] + [text_features] + [c[1] for c in others_after]
                    )
                    loss = loss_fn(all_images, all_texts, *scales)
                loss.backward()
        return loss.detach()


def _attention_kernels() -> AbstractContextManager:
    """A fresh context choosing the attention kernel for one forward and backward pass.

    On CPU the fused (flash) attention kernel's backward is slow for short sequences: the plain
    math kernel trained CLIP-Tiny twice as fast here (17 image tokens, 20 text tokens).
    """
    return nullcontext() if torch.cuda.is_available() else sdpa_kernel([SDPBackend.MATH])
