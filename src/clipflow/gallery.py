"""A search gallery: the L2-normalised image embeddings of one data split, with ids and captions.

`clipflow package --gallery DIR` builds it from an ingested data directory and stores it inside
the BentoML model, so a Bento carries the index its `search` endpoint answers from:

    gallery/embeddings.pt   a float32 tensor (N, D), rows L2-normalised; loaded weights_only
    gallery/items.json      {"ids": [...], "captions": [...]}, row i describes embedding i
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.model import ClipModel

DIRECTORY = "gallery"
EMBEDDINGS_FILE = "embeddings.pt"
ITEMS_FILE = "items.json"


@dataclass(frozen=True)
class Gallery:
    """Gallery items: `ids[i]` and `captions[i]` describe row i of `embeddings` (N, D)."""

    ids: list[str]
    captions: list[str]
    embeddings: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The `k` items most similar to a normalised query embedding (D,), best first.

        Returns dicts with `id`, `caption` and `score`, the cosine similarity.
        """
        top = torch.topk(self.embeddings @ query, min(k, len(self)))  # scores (N,) -> best k
        return [
            {"id": self.ids[i], "caption": self.captions[i], "score": score}
            for score, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def save(self, directory: Path) -> Path:
        """Write the gallery under `directory/gallery/`; returns that folder."""
        folder = Path(directory) / DIRECTORY
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.embeddings.contiguous(), folder / EMBEDDINGS_FILE)
        (folder / ITEMS_FILE).write_text(json.dumps({"ids": self.ids, "captions": self.captions}))
        return folder


def load(directory: Path) -> Gallery | None:
    """The gallery saved under `directory/gallery/`, or None when there is none."""
    folder = Path(directory) / DIRECTORY
    if not (folder / EMBEDDINGS_FILE).is_file():
        return None
    # weights_only: a tensor file is data, and loading it must not be able to run code.
    embeddings = torch.load(folder / EMBEDDINGS_FILE, map_location="cpu", weights_only=True)
    items = json.loads((folder / ITEMS_FILE).read_text())
    return Gallery(ids=items["ids"], captions=items["captions"], embeddings=embeddings)


def build(clip: ClipModel, data_dir: Path, split: str, batch_size: int) -> Gallery:
    """Embed every image of `split` in an ingested data directory with the model's eval preprocess.

    Ids are the samples' keys, captions their captions.

    Raises:
        ClipflowError: the directory has no such split, or the split is empty.
    """
    try:
        pairs = ShardPairs(Path(data_dir), split, clip.preprocess, clip.tokenizer)
    except FileNotFoundError:
        raise ClipflowError(f"gallery: {data_dir} has no split {split!r} (serve.gallery_split)") from None
    if not len(pairs):
        raise ClipflowError(f"gallery: split {split!r} of {data_dir} is empty")
    return Gallery(
        ids=list(pairs.index.keys),
        captions=[pairs.caption(i) for i in range(len(pairs))],
        embeddings=pairs.embed_images(clip.encode_images, batch_size, desc=f"gallery {split}"),
    )
