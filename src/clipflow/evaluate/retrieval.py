"""Retrieval both ways on one split: every image against every caption, and every caption against every image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from clipflow.evaluate.embeddings import SplitEmbeddings, check_rankable
from clipflow.evaluate.metrics import recall_at_k
from clipflow.model import ClipModel

GRID_QUERIES = 6
GRID_TOP_K = 5


@dataclass(frozen=True)
class RetrievalGrid:
    """A handful of distinct captions, each with its top images; a hit is an image of that very caption."""

    queries: list[str]
    images: list[list[Image.Image]]
    hits: list[list[bool]]


@dataclass(frozen=True)
class RetrievalResult:
    split: str
    i2t: dict[int, float]  # k -> recall@k of image queries over captions
    t2i: dict[int, float]
    grid: RetrievalGrid

    def metrics(self) -> dict[str, float]:
        return {f"retrieval_i2t_r{k}": v for k, v in self.i2t.items()} | {
            f"retrieval_t2i_r{k}": v for k, v in self.t2i.items()
        }


def retrieval(
    clip: ClipModel, images: SplitEmbeddings, split: str, batch_size: int, ks: list[int], chunk_size: int
) -> RetrievalResult:
    pairs, image_embeddings = images(split)
    captions = [pairs.caption(i) for i in range(len(pairs))]
    texts = torch.cat([clip.encode_text(captions[s : s + batch_size]) for s in range(0, len(captions), batch_size)])
    check_rankable(texts, f"caption embeddings of split {split!r}")
    i2t = recall_at_k(image_embeddings, texts, ks, chunk_size=chunk_size)
    t2i = recall_at_k(texts, image_embeddings, ks, chunk_size=chunk_size)

    # Several images share a caption in the built-in data: a hit is any image whose own caption is the query.
    queries = list(dict.fromkeys(captions))[:GRID_QUERIES]
    top = (clip.encode_text(queries) @ image_embeddings.T).topk(min(GRID_TOP_K, len(pairs)), dim=1).indices
    grid = RetrievalGrid(
        queries=queries,
        images=[[pairs.image(int(i)) for i in row] for row in top],
        hits=[[captions[int(i)] == query for i in row] for query, row in zip(queries, top, strict=True)],
    )
    return RetrievalResult(split=split, i2t=i2t, t2i=t2i, grid=grid)
