"""The tiled losses against open_clip's ClipLoss and SigLipLoss as the oracles.

Values and gradients (image features, text features, logit scale, logit bias) must agree for
batch sizes that are and are not multiples of the tile, on 1 to 4 ranks of a real gloo process
group, for fp32 inputs and, to bf16's own tolerance, for bf16 inputs.
"""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import SigLipLoss

from clipflow.train.loss import TiledClipLoss, TiledSigLipLoss, build_loss
from tests.support.servers import free_port

DIM = 32


def _features(world_size: int, local: int, dtype: torch.dtype, seed: int = 0):
    """The same global batch on every rank: (B, d) image and text features, log logit scale, logit bias."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(world_size * local, DIM, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.7 * torch.randn(images.shape, generator=generator), dim=-1)
    return images.to(dtype), texts.to(dtype), torch.tensor(2.5), torch.tensor(-4.0)


def _loss_and_grads(loss_fn, images, texts, scale_log, bias, rank, local):
    image = images[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    text = texts[rank * local : (rank + 1) * local].clone().requires_grad_(True)
    log_scale = scale_log.clone().requires_grad_(True)
    logit_bias = bias.clone().requires_grad_(True)
    loss = loss_fn(image, text, log_scale.exp(), logit_bias)
    loss.backward()
    grads = (loss.detach(), image.grad, text.grad, log_scale.grad)
    # A bias cancels in a softmax: only the sigmoid loss has a gradient for it.
    return grads + (logit_bias.grad,) if isinstance(loss_fn, (TiledSigLipLoss, SigLipLoss)) else grads


def _oracle(kind: str, rank: int, world_size: int) -> torch.nn.Module:
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    if world_size == 1:
        return open_clip.ClipLoss()
    return open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def _compare(kind: str, rank: int, world_size: int, local: int, tile: int, dtype: torch.dtype) -> None:
    images, texts, scale_log, bias = _features(world_size, local, dtype)
    ours_fn = TiledSigLipLoss(tile=tile) if kind == "siglip" else TiledClipLoss(tile=tile)
    ours = _loss_and_grads(ours_fn, images, texts, scale_log, bias, rank, local)
    # The oracle sees the same values in fp32: bf16 is judged against exact arithmetic.
    oracle = _loss_and_grads(
        _oracle(kind, rank, world_size), images.float(), texts.float(), scale_log, bias, rank, local
    )
    names = ("loss", "d image", "d text", "d logit_scale", "d logit_bias")
    for name, mine, theirs in zip(names[: len(oracle)], ours, oracle, strict=True):
        # Relative to each tensor's largest value: an element that is nearly zero by cancellation
        # carries the rounding error of the largest terms in either implementation.
        scale = theirs.abs().max().item()
        if dtype == torch.float32:
            tolerance = {"rtol": 1e-5, "atol": 1e-5 * scale + 1e-9}
        else:  # bf16 keeps 8 bits of mantissa
            tolerance = {"rtol": 2e-2, "atol": 1e-2 * scale + 1e-7}
        torch.testing.assert_close(mine.float(), theirs, **tolerance, msg=lambda m, n=name: f"{kind} {n}: {m}")


# (local batch, dtype): a multiple of the tile of 16, and not; and bf16.
DISTRIBUTED_CASES = [(48, torch.float32), (37, torch.float32), (37, torch.bfloat16)]


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for kind in ("tiled", "siglip"):
            for local, dtype in DISTRIBUTED_CASES:
                _compare(kind, rank, world_size, local, 16, dtype)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["tiled", "siglip"])
@pytest.mark.parametrize("local", [96, 100])  # a multiple of the tile, and not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_matches_open_clip(kind, local, dtype):
    _compare(kind, rank=0, world_size=1, local=local, tile=32, dtype=dtype)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_ranks_match_open_clip_with_gathered_gradients(world_size):
    mp.start_processes(_worker, args=(world_size, free_port()), nprocs=world_size, join=True, start_method="spawn")


@pytest.mark.parametrize("loss", [TiledClipLoss(tile=128), TiledSigLipLoss(tile=128)])
def test_memory_stays_within_one_tile_of_logits(loss):
    """Backward keeps log-sum-exps, not logits: saved tensors are O(B x d), never O(B x B)."""
    images, texts, scale_log, bias = _features(1, 2048, torch.float32)
    image, text = images.requires_grad_(True), texts.requires_grad_(True)
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(image, text, scale_log.exp(), bias)
    assert max(saved_bytes) <= 2048 * DIM * 4  # the features themselves, at most


def test_sigmoid_loss_asks_for_the_logit_bias():
    images, texts, scale_log, _ = _features(1, 4, torch.float32)
    with pytest.raises(ValueError, match="logit_bias"):
        build_loss("siglip", rank=0, world_size=1)(images, texts, scale_log.exp())
