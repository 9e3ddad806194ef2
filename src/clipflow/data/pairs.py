"""Image-caption pairs of one split, read by position from its shards, ready for a model."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from clipflow.data.shards import ShardIndex
from clipflow.progress import progress


class ShardPairs(torch.utils.data.Dataset):
    """(image tensor, token ids) pairs of one split, read by position from the shards."""

    def __init__(self, data_dir: Path, split: str, preprocess: Callable, tokenizer: Callable):
        self.index = ShardIndex.of_split(data_dir, split)
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocess(self.image(i)), self.tokenizer([self.caption(i)])[0]

    def image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.encoded(i))).convert("RGB")

    def encoded(self, i: int) -> bytes:
        """The image file of sample `i`, as stored."""
        return self.index.read(i, self.index.image_ext(i))

    def caption(self, i: int) -> str:
        return self.index.read(i, "txt").decode()

    def meta(self, i: int) -> dict:
        return json.loads(self.index.read(i, "json"))

    @torch.no_grad()
    def embed_images(
        self, encode_images: Callable, batch_size: int, desc: str, positions: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The images at `positions` (default: all) through `preprocess` and `encode_images`, in order: (N, D)."""
        positions = range(len(self)) if positions is None else positions
        chunks = []
        starts = range(0, len(positions), batch_size)
        for start in progress(starts, total=len(starts), desc=desc):
            batch = positions[start : start + batch_size]
            chunks.append(encode_images(torch.stack([self.preprocess(self.image(i)) for i in batch])))
        return torch.cat(chunks)
