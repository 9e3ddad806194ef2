"""The tiled contrastive loss against open_clip's ClipLoss as the oracle.

Values and gradients (image features, text features, logit scale) must agree for batch sizes
that are and are not multiples of the tile, on 1 to 4 ranks of a real gloo process group,
for fp32 inputs and, to bf16's own tolerance, for bf16 inputs.
"""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipflow.train.loss import TiledClipLoss
from tests.conftest import free_port

DIM = 32


def _features(world_size: int, local: int, dtype: torch.dtype, seed: int = 0):
    """The same global batch on every rank: (B, d) image and text features, and a logit scale."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(world_size * local, DIM, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.7 * torch.randn(images.shape, generator=generator), dim=-1)
    return images.to(dtype), texts.to(dtype), torch.tensor(2.5)


def _loss_and_grads(loss_fn, images, texts, scale_log, rank, local):
    image = images[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    text = texts[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    log_scale = scale_log.clone().requires_grad_(True)
    loss = loss_fn(image, text, log_scale.exp())
    loss.backward()
    return loss.detach(), image.grad, text.grad, log_scale.grad


def _compare(rank: int, world_size: int, local: int, tile: int, dtype: torch.dtype) -> None:
    images, texts, scale_log = _features(world_size, local, dtype)
    ours = _loss_and_grads(TiledClipLoss(tile=tile), images, texts, scale_log, rank, local)
    oracle_loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    if world_size == 1:
        oracle_loss = open_clip.ClipLoss()
    # The oracle sees the same values in fp32: bf16 is judged against exact arithmetic.
    oracle = _loss_and_grads(oracle_loss, images.float(), texts.float(), scale_log, rank, local)
    for name, mine, theirs in zip(("loss", "d image", "d text", "d logit_scale"), ours, oracle, strict=True):
        if dtype == torch.float32:
            tolerance = {"rtol": 1e-5, "atol": 1e-7}
        else:  # bf16 keeps 8 bits of mantissa: errors scale with the largest value
            tolerance = {"rtol": 2e-2, "atol": 1e-2 * theirs.abs().max().item()}
        torch.testing.assert_close(mine.float(), theirs, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


# (local batch, dtype): a multiple of the tile of 16, and not; and bf16.
DISTRIBUTED_CASES = [(48, torch.float32), (37, torch.float32), (37, torch.bfloat16)]


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for local, dtype in DISTRIBUTED_CASES:
            _compare(rank, world_size, local, 16, dtype)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local", [96, 100])  # a multiple of the tile, and not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_matches_clip_loss(local, dtype):
    _compare(rank=0, world_size=1, local=local, tile=32, dtype=dtype)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_ranks_match_clip_loss_with_gathered_gradients(world_size):
    mp.start_processes(_worker, args=(world_size, free_port()), nprocs=world_size, join=True, start_method="spawn")


def test_memory_stays_within_one_tile_of_logits():
    """Backward keeps row log-sum-exps, not logits: saved tensors are O(B x d), never O(B x B)."""
    images, texts, scale_log = _features(1, 2048, torch.float32)
    image, text = images.requires_grad_(True), texts.requires_grad_(True)
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TiledClipLoss(tile=128)(image, text, scale_log.exp())
    assert max(saved_bytes) <= 2048 * DIM * 4  # the features themselves, at most
