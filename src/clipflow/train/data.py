"""Training batches from shards: a deterministic global order, split across ranks.

Step `s` of a run always sees the same samples, whatever the number of processes: the
global batch is a slice of a seeded per-epoch permutation, and rank `r` takes the r-th
contiguous part of it. Each sample's random crop is drawn from its own seed (run seed, step,
position in the global batch), so a batch is the same whichever process or data-loader worker
builds it. That makes runs reproducible and a resume exact.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as F
from open_clip.transform import MaybeConvertMode, MaybeToTensor
from PIL import Image
from torchvision import transforms

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError


def global_batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sample indices of global step `step` (0-based); the last partial batch of an epoch is dropped."""
    steps_per_epoch = num_samples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training samples")
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size]


class TrainAugment:
    """open_clip's training transform, split so that its tensor work runs once per batch.

    The model's transform is RandomResizedCrop, then RGB, to-tensor and normalise, per image;
    for the small images of a CLIP batch the per-image tensor calls cost more than the crop.
    `crop` does the crop (torchvision's own `resized_crop`) and returns uint8 pixels;
    `normalize` scales a whole uint8 batch with the same arithmetic as ToTensor and Normalize.
    """

    def __init__(self, transform: transforms.Compose):
        steps = transform.transforms
        kinds = [type(step) for step in steps]
        if kinds != [transforms.RandomResizedCrop, MaybeConvertMode, MaybeToTensor, transforms.Normalize]:
            raise ClipflowError(f"unsupported training transform {[kind.__name__ for kind in kinds]}")
        crop, _, _, normalize = steps
        self.size, self.scale, self.ratio = list(crop.size), crop.scale, crop.ratio
        self.interpolation = crop.interpolation
        self.mean, self.std = normalize.mean, normalize.std

    def crop(self, image: Image.Image, seed: int) -> np.ndarray:
        """The random crop of `image` drawn from `seed`, resized to the model's input: (H, W, 3) uint8."""
        left, top, width, height = crop_box(image.width, image.height, self.scale, self.ratio, random.Random(seed))
        cropped = F.resized_crop(image.convert("RGB"), top, left, height, width, self.size, self.interpolation)
        return np.asarray(cropped)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device to the model's normalised float input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return images.float().div(255).sub_(mean).div_(std)


def crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, width, height), drawn from `rng`.

    The same rule as torchvision's `RandomResizedCrop.get_params`, which draws from torch's
    global generator (so the box would depend on which process asks) at ~80 us a call.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback after ten misses: the central crop at the nearest allowed aspect ratio.
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class RankBatches(torch.utils.data.Dataset):
    """Item k: this rank's part of global step `start_step + k`, as (uint8 images, token ids).

    A dataset of whole batches, so a DataLoader with workers builds whole batches in parallel
    and still hands them over in step order.
    """

    def __init__(
        self,
        pairs: ShardPairs,
        augment: TrainAugment,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        steps: int,
    ):
        self.pairs, self.augment = pairs, augment
        self.batch_size, self.seed, self.start_step, self.steps = batch_size, seed, start_step, steps
        self.per_rank = batch_size // world_size
        self.first = rank * self.per_rank

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.start_step + k
        indices = global_batch_indices(len(self.pairs), self.batch_size, step, self.seed)
        indices = indices[self.first : self.first + self.per_rank].tolist()
        images = [
            self.augment.crop(self.pairs.image(i), sample_seed(self.seed, step, self.first + n))
            for n, i in enumerate(indices)
        ]
        tokens = self.pairs.tokenizer([self.pairs.caption(i) for i in indices])
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), tokens


def sample_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of one sample: a function of where it sits in the run, not of who loads it."""
    return hash((seed, step, position))


def rank_loader(batches: RankBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches in step order; with `workers` > 0 they are built ahead in that many processes."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )
