"""The optimizer and its schedule: AdamW over two parameter groups, cosine decay after a linear warmup."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from clipflow.params import TrainParams


def build_optimizer(
    module: torch.nn.Module, params: TrainParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `module`'s trainable parameters and its learning-rate schedule, stepped once per optimizer step."""
    # The fused kernel updates all parameters in one pass instead of a loop of small kernels per tensor.
    groups = param_groups(module, params.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(params.warmup_steps, params.steps))
    return optimizer, scheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear up to 1 over `warmup_steps`, then a cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_fraction)))

    return factor
