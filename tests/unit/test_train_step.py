"""One optimizer step on its own: the update keeps the logit scale where CLIP bounds it."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from clipflow import model as clip_model
from clipflow.train.loss import build_loss
from clipflow.train.optim import build_optimizer
from clipflow.train.step import MAX_LOGIT_SCALE, optimizer_step


@pytest.mark.parametrize(("start", "bound"), [(math.log(1000.0), MAX_LOGIT_SCALE), (-1.0, 0.0)])
def test_a_step_clamps_the_logit_scale_to_zero_and_log_100(small_params, start, bound):
    """CLIP clips the temperature at 100 so training stays stable; a step that leaves it outside is clamped back."""
    torch.manual_seed(0)
    module = clip_model.create("CLIP-Tiny").model
    optimizer, scheduler = build_optimizer(module, small_params.train)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 49000, (8, 20), generator=generator)
    with torch.no_grad():
        module.logit_scale.fill_(start)
    # One AdamW step moves a parameter by about the learning rate: far less than the distance to the bound.
    assert abs(start - bound) > 100 * small_params.train.lr
    optimizer_step(module, module, optimizer, scheduler, build_loss("clip", 0, 1), images, tokens, 1, nullcontext())
    assert module.logit_scale.item() == pytest.approx(bound, abs=1e-7)
