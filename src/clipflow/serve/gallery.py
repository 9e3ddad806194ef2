"""A search gallery: the L2-normalised image embeddings of one data split, with ids and captions.

`clipflow package --gallery DIR` builds it from an ingested data directory and stores it inside
the BentoML model, so a Bento carries the index its `search` endpoint answers from:

    gallery/embeddings.pt   a float32 tensor (N, D), rows L2-normalised; loaded weights_only
    gallery/items.json      {"ids": [...], "captions": [...], "thumbnail_offsets": [...]}, row i
                            describes embedding i
    gallery/thumbnails.bin  the items' images as PNG thumbnails, one after another; item i is
                            bytes offsets[i]:offsets[i + 1], so a server reads one without loading all
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.model import ClipModel

DIRECTORY = "gallery"
EMBEDDINGS_FILE = "embeddings.pt"
ITEMS_FILE = "items.json"
THUMBNAILS_FILE = "thumbnails.bin"


@dataclass(frozen=True)
class Gallery:
    """Gallery items: `ids[i]` and `captions[i]` describe row i of `embeddings` (N, D).

    `thumbnails` holds item i's PNG thumbnail at bytes `thumbnail_offsets[i]:thumbnail_offsets[i + 1]`:
    the bytes themselves while building, the saved file once loaded.
    """

    ids: list[str]
    captions: list[str]
    embeddings: torch.Tensor
    thumbnails: bytes | Path
    thumbnail_offsets: list[int]
    _rows: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {item_id: row for row, item_id in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def thumbnail(self, item_id: str) -> bytes | None:
        """The PNG thumbnail of the item `item_id`, or None when the gallery has no such item."""
        row = self._rows.get(item_id)
        if row is None:
            return None
        start, end = self.thumbnail_offsets[row], self.thumbnail_offsets[row + 1]
        if isinstance(self.thumbnails, bytes):
            return self.thumbnails[start:end]
        with self.thumbnails.open("rb") as file:
            file.seek(start)
            return file.read(end - start)

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
        thumbnails = self.thumbnails if isinstance(self.thumbnails, bytes) else self.thumbnails.read_bytes()
        (folder / THUMBNAILS_FILE).write_bytes(thumbnails)
        items = {"ids": self.ids, "captions": self.captions, "thumbnail_offsets": self.thumbnail_offsets}
        (folder / ITEMS_FILE).write_text(json.dumps(items))
        return folder


def load(directory: Path) -> Gallery | None:
    """The gallery saved under `directory/gallery/`, or None when there is none."""
    folder = Path(directory) / DIRECTORY
    if not (folder / EMBEDDINGS_FILE).is_file():
        return None
    # weights_only: a tensor file is data, and loading it must not be able to run code.
    embeddings = torch.load(folder / EMBEDDINGS_FILE, map_location="cpu", weights_only=True)
    items = json.loads((folder / ITEMS_FILE).read_text())
    return Gallery(
        ids=items["ids"],
        captions=items["captions"],
        embeddings=embeddings,
        thumbnails=folder / THUMBNAILS_FILE,
        thumbnail_offsets=items["thumbnail_offsets"],
    )


def build(clip: ClipModel, data_dir: Path, split: str, batch_size: int, thumbnail_px: int) -> Gallery:
    """Embed every image of `split` in an ingested data directory with the model's eval preprocess.

    Ids are the samples' keys, captions their captions; each image is also kept as a PNG
    thumbnail at most `thumbnail_px` on its longer side, for clients that show results.

    Raises:
        ClipflowError: the directory has no such split, or the split is empty.
    """
    try:
        pairs = ShardPairs(Path(data_dir), split, clip.preprocess, clip.tokenizer)
    except FileNotFoundError:
        raise ClipflowError(f"gallery: {data_dir} has no split {split!r} (serve.gallery_split)") from None
    if not len(pairs):
        raise ClipflowError(f"gallery: split {split!r} of {data_dir} is empty")
    thumbnails = [_thumbnail(pairs.image(i), thumbnail_px) for i in range(len(pairs))]
    return Gallery(
        ids=list(pairs.index.keys),
        captions=[pairs.caption(i) for i in range(len(pairs))],
        embeddings=pairs.embed_images(clip.encode_images, batch_size, desc=f"gallery {split}"),
        thumbnails=b"".join(thumbnails),
        thumbnail_offsets=[0, *itertools.accumulate(map(len, thumbnails))],
    )


def _thumbnail(image: Image.Image, size: int) -> bytes:
    image.thumbnail((size, size))  # in place, keeps the aspect ratio, never enlarges
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
