"""Training batches from shards: a deterministic global order, split across ranks.

Step `s` of a run always sees the same samples, whatever the number of processes: the
global batch is a slice of a seeded per-epoch permutation, and rank `r` takes the r-th
contiguous part of it. Each sample's random crop is drawn from its own seed (run seed, step,
position in the global batch), so a batch is the same whichever process or data-loader worker
builds it. That makes runs reproducible and a resume exact.

Images reach the model one of two ways (`train.decode`), with the same crops: decoded and cropped
on the CPU by Pillow, in the data-loader workers, or handed over still encoded and decoded on the
training device in a batch (`DeviceDecoder`, nvJPEG on a GPU). Either way a JPEG whose crop is
large enough is decoded at 1/2, 1/4 or 1/8 scale: libjpeg's DCT scaling on the CPU, the same
reduction as a box average on the device.
"""

from __future__ import annotations

import io
import math
import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transform import MaybeConvertMode, MaybeToTensor
from PIL import Image
from torchvision import io as tvio
from torchvision import transforms

from clipflow.artifacts import IngestReport
from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError


def global_batch_indices(num_samples: int, batch_size: int, step: int, seed: int, group: int = 1) -> torch.Tensor:
    """The sample indices of global step `step` (0-based): shuffled groups of `group` consecutive samples, each
    group whole in one batch; the last partial batch of an epoch, and a last partial group, are dropped."""
    groups, groups_per_batch = num_samples // group, batch_size // group
    steps_per_epoch = groups // groups_per_batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {groups * group} training samples")
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(groups, generator=generator)[position * groups_per_batch : (position + 1) * groups_per_batch]
    return (order[:, None] * group + torch.arange(group)).flatten()


def batch_group(setting: int | str, data_dir: Path, batch_size: int) -> int:
    """`train.batch_group`: `auto` keeps the built-in data's twin scenes together (2) and other data's samples apart.

    Raises:
        ClipflowError: the batch size is not a whole number of groups.
    """
    group = setting if setting != "auto" else (2 if IngestReport.read(data_dir).source == "builtin" else 1)
    if batch_size % group:
        why = " (auto: 2 on the built-in data, whose scenes come in twins)" if setting == "auto" else ""
        raise ClipflowError(f"train.batch_size {batch_size} must be a multiple of train.batch_group {group}{why}")
    return group


# The scales libjpeg decodes a JPEG at (DCT scaling), largest reduction first.
JPEG_REDUCTIONS = (8, 4, 2, 1)
JPEG_MAGIC = b"\xff\xd8"
# The resamplings of open_clip's crop that torch's antialiased resize has (in torch's names).
RESAMPLINGS = ("bilinear", "bicubic")


class CropPlan(NamedTuple):
    """Where one sample's crop lies: the JPEG reduction to decode at, and the box in reduced pixels."""

    reduction: int
    left: int
    top: int
    right: int
    bottom: int


class EncodedImages(NamedTuple):
    """A batch handed over still encoded (`train.decode: gpu`): bytes and crop plans, one per image."""

    payloads: list[torch.Tensor]  # uint8, 1-D: each image's file
    plans: torch.Tensor  # (N, 5) int64: `CropPlan` fields


class TrainAugment:
    """open_clip's training transform, split so that its tensor work runs once per batch.

    The model's transform is RandomResizedCrop, then RGB, to-tensor and normalise, per image;
    for the small images of a CLIP batch the per-image tensor calls cost more than the crop.
    `crop` (decoded by Pillow) or `crop_decoded` (decoded on the device) crops and resizes to uint8 pixels;
    `normalize` scales a whole uint8 batch with the same arithmetic as ToTensor and Normalize.
    """

    def __init__(self, transform: transforms.Compose):
        steps = transform.transforms
        kinds = [type(step) for step in steps]
        if kinds != [transforms.RandomResizedCrop, MaybeConvertMode, MaybeToTensor, transforms.Normalize]:
            raise ClipflowError(f"unsupported training transform {[kind.__name__ for kind in kinds]}")
        crop, _, _, normalize = steps
        if crop.interpolation.value not in RESAMPLINGS:
            raise ClipflowError(f"unsupported training interpolation {crop.interpolation.value}")
        self.size, self.scale, self.ratio = list(crop.size), crop.scale, crop.ratio
        self.interpolation = crop.interpolation.value
        self.mean, self.std = normalize.mean, normalize.std

    def plan(self, width: int, height: int, jpeg: bool, seed: int) -> CropPlan:
        """The crop of a `width` x `height` image drawn from `seed`, at the largest JPEG reduction that
        still leaves the crop at least the model's input size (1 for other formats)."""
        left, top, box_width, box_height = crop_box(width, height, self.scale, self.ratio, random.Random(seed))
        out_height, out_width = self.size
        # Pillow's own rule (`JpegImageFile.draft`) for the size the whole image must keep.
        needed = (math.ceil(width * out_width / box_width), math.ceil(height * out_height / box_height))
        fits = min(width // needed[0], height // needed[1])
        reduction = next(r for r in JPEG_REDUCTIONS if fits >= r) if jpeg else 1
        # Reduced pixels hold whole source pixels: the box grows to the reduced pixels it touches.
        right, bottom = math.ceil((left + box_width) / reduction), math.ceil((top + box_height) / reduction)
        return CropPlan(reduction, left // reduction, top // reduction, right, bottom)

    def crop(self, payload: bytes, seed: int) -> torch.Tensor:
        """The random crop of the image file `payload` drawn from `seed`, at the model's input size: (3, H, W) uint8."""
        image = Image.open(io.BytesIO(payload))
        plan = self.plan(image.width, image.height, image.format == "JPEG", seed)
        if plan.reduction > 1:
            image.draft("RGB", (image.width // plan.reduction, image.height // plan.reduction))
        # Only the box is copied out of the decoded image, and it stays channels-last for the resize.
        box = np.ascontiguousarray(np.asarray(image.convert("RGB"))[plan.top : plan.bottom, plan.left : plan.right])
        return self._resize(torch.from_numpy(box).permute(2, 0, 1))

    def encoded(self, payload: bytes, seed: int) -> tuple[torch.Tensor, CropPlan]:
        """The image file as a tensor to decode on the device, with its crop plan (the header alone is read)."""
        with Image.open(io.BytesIO(payload)) as image:
            plan = self.plan(image.width, image.height, image.format == "JPEG", seed)
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8), plan

    def crop_decoded(self, pixels: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """`crop` on decoded full-size pixels (3, H, W) uint8, on their device: (3, h, w) uint8.

        The JPEG reduction is a box average, which DCT scaling approximates: a fraction of a
        level apart on average. At full scale the pixels are `crop`'s within rounding.
        """
        if plan.reduction > 1:
            reduced = F.avg_pool2d(pixels.unsqueeze(0).float(), plan.reduction, ceil_mode=True)
            pixels = reduced.round_().to(torch.uint8)[0]
        return self._resize(pixels[:, plan.top : plan.bottom, plan.left : plan.right])

    def _resize(self, box: torch.Tensor) -> torch.Tensor:
        """A cropped box (3, h, w) uint8 at the model's input size, resampled as Pillow resamples
        (torch's antialiased filters, within two levels of Pillow's)."""
        if box.device.type == "cpu":  # torch's uint8 kernels, about 3x Pillow's here, exist on the CPU only
            return F.interpolate(box.unsqueeze(0), self.size, mode=self.interpolation, antialias=True)[0]
        resized = F.interpolate(box.unsqueeze(0).float(), self.size, mode=self.interpolation, antialias=True)
        return resized.round_().clamp_(0, 255).to(torch.uint8)[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device to the model's normalised float input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        # In place after the one conversion: ToTensor's and Normalize's arithmetic without a second full-size copy.
        return images.float().div_(255).sub_(mean).div_(std)


class DeviceDecoder:
    """Encoded batches decoded and cropped on the training device: nvJPEG on a GPU, in one batched call."""

    def __init__(self, augment: TrainAugment, device: torch.device):
        self.augment, self.device = augment, device

    def __call__(self, batch: EncodedImages) -> torch.Tensor:
        jpegs = [i for i, payload in enumerate(batch.payloads) if payload[:2].tolist() == list(JPEG_MAGIC)]
        decoded: dict[int, torch.Tensor] = {}
        if jpegs:
            pixels = tvio.decode_jpeg(
                [batch.payloads[i] for i in jpegs], mode=tvio.ImageReadMode.RGB, device=self.device
            )
            decoded.update(zip(jpegs, pixels, strict=True))
        for i, payload in enumerate(batch.payloads):
            if i not in decoded:  # PNG and the rest: decoded by the CPU, cropped on the device
                decoded[i] = tvio.decode_image(payload, mode=tvio.ImageReadMode.RGB).to(self.device)
        plans = [CropPlan(*plan) for plan in batch.plans.tolist()]
        return torch.stack([self.augment.crop_decoded(decoded[i], plan) for i, plan in enumerate(plans)])


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
    """Item k: this rank's part of global step `start_step + k`, as (images, token ids).

    A dataset of whole batches, so a DataLoader with workers builds whole batches in parallel
    and still hands them over in step order. Each global batch holds whole groups of `group`
    consecutive samples. Images are cropped uint8 (N, 3, H, W), or with `encoded` the
    `EncodedImages` that a `DeviceDecoder` turns into the same.
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
        encoded: bool = False,
        group: int = 1,
    ):
        self.pairs, self.augment, self.encoded, self.group = pairs, augment, encoded, group
        self.batch_size, self.seed, self.start_step, self.steps = batch_size, seed, start_step, steps
        self.per_rank = batch_size // world_size
        self.first = rank * self.per_rank

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __getitem__(self, k: int) -> tuple[torch.Tensor | EncodedImages, torch.Tensor]:
        step = self.start_step + k
        indices = global_batch_indices(len(self.pairs), self.batch_size, step, self.seed, self.group)
        indices = indices[self.first : self.first + self.per_rank].tolist()
        seeds = [sample_seed(self.seed, step, self.first + n) for n in range(len(indices))]
        tokens = self.pairs.tokenizer([self.pairs.caption(i) for i in indices])
        if self.encoded:
            encoded = [self.augment.encoded(self.pairs.encoded(i), s) for i, s in zip(indices, seeds, strict=True)]
            plans = torch.tensor([plan for _, plan in encoded])
            return EncodedImages([payload for payload, _ in encoded], plans), tokens
        images = [self.augment.crop(self.pairs.encoded(i), s) for i, s in zip(indices, seeds, strict=True)]
        return torch.stack(images), tokens


def sample_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of one sample: a function of where it sits in the run, not of who loads it."""
    return hash((seed, step, position))


def data_workers(setting: int | str, processes_here: int, threads_per_proc: int) -> int:
    """`train.data_workers` per training process: as set, or for `auto` the cores this machine lets
    the process have beyond its own compute threads (0: batches are built in line)."""
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores // processes_here - threads_per_proc)


def rank_loader(batches: RankBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches in step order; with `workers` > 0 they are built ahead in that many processes, and on a
    GPU land in pinned memory so the copy to the device overlaps the step."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )
