"""Image embeddings per split, computed once and shared by every evaluation that needs them."""

from __future__ import annotations

from pathlib import Path

import torch

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.model import ClipModel


class SplitEmbeddings:
    """`images(split)` -> (the split's pairs, their L2-normalised image embeddings), each split embedded once."""

    def __init__(self, clip: ClipModel, data_dir: Path, batch_size: int):
        self.clip, self.data_dir, self.batch_size = clip, data_dir, batch_size
        self._cache: dict[str, tuple[ShardPairs, torch.Tensor]] = {}

    def __call__(self, split: str) -> tuple[ShardPairs, torch.Tensor]:
        if split not in self._cache:
            try:
                pairs = ShardPairs(self.data_dir, split, self.clip.preprocess, self.clip.tokenizer)
            except FileNotFoundError:
                raise ClipflowError(f"the data has no split {split!r} to evaluate") from None
            embeddings = pairs.embed_images(self.clip.encode_images, self.batch_size, desc=f"evaluate {split}")
            self._cache[split] = (pairs, embeddings)
        return self._cache[split]
