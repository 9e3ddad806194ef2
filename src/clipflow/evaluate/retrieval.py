"""Retrieval both ways on one split: every image against every caption, and every caption against every image.

Pair-level recall@k counts a query as found only when its own pair is in the top k, as CLIP_benchmark
does. Many captions of the built-in data describe the same label in other words ("a red circle", "a
small red circle at the top"), so label-level recall@k also counts any item of the query's label
(`evaluate.retrieval_label_field`): it tells a model that finds the right kind of thing from one
that does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import SplitEmbeddings, check_rankable
from clipflow.evaluate.metrics import hit_rates, label_recall_at_k, recall_hits_at_k
from clipflow.metric_names import retrieval_metric
from clipflow.model import ClipModel

GRID_QUERIES = 6
GRID_TOP_K = 5

# How a retrieved item relates to its query, in the grid.
PAIR = "pair"  # the query's own caption (several images can share one caption)
SAME_LABEL = "same label"  # another caption of the query's label
OTHER = "other"


@dataclass(frozen=True)
class Retrieved:
    """One item a query retrieved: an image (text to image) or a caption (image to text)."""

    item: Image.Image | str
    sample: int  # its position in the split; for a caption, its first sample's
    rank: int  # 1 is the best
    score: float  # cosine similarity to the query
    relation: str  # PAIR, SAME_LABEL or OTHER


@dataclass(frozen=True)
class GridRow:
    query: Image.Image | str
    retrieved: list[Retrieved]


@dataclass(frozen=True)
class RetrievalGrid:
    """A handful of distinct captions with their top images, and their images with their top distinct captions."""

    text_to_image: list[GridRow]
    image_to_text: list[GridRow]
    label_field: str | None


@dataclass(frozen=True)
class RetrievalResult:
    split: str
    i2t: dict[int, float]  # k -> recall@k of image queries over captions
    t2i: dict[int, float]
    grid: RetrievalGrid
    # k -> label-level recall@k, as above; empty without a label field
    i2t_label: dict[int, float] = field(default_factory=dict)
    t2i_label: dict[int, float] = field(default_factory=dict)
    # Per query, for the paired bootstrap of the gate: the samples' keys in split order, and k -> (N,) bool
    # whether image (i2t) or caption (t2i) i found its pair in its k best.
    keys: list[str] = field(default_factory=list)
    i2t_hits: dict[int, torch.Tensor] = field(default_factory=dict)
    t2i_hits: dict[int, torch.Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Pair-level `retrieval_{i2t,t2i}_r{k}` (the names the gate reads), then `retrieval_{i2t,t2i}_label_r{k}`."""
        directions = {("i2t", False): self.i2t, ("t2i", False): self.t2i}
        directions |= {("i2t", True): self.i2t_label, ("t2i", True): self.t2i_label}
        return {
            retrieval_metric(direction, k, by_label): v
            for (direction, by_label), recalls in directions.items()
            for k, v in recalls.items()
        }

    def per_item(self) -> dict[str, torch.Tensor]:
        """The pair-level metrics of `metrics()` as their (N,) hits per query, in `keys` order."""
        hits = {f"retrieval_i2t_r{k}": v for k, v in self.i2t_hits.items()}
        return hits | {f"retrieval_t2i_r{k}": v for k, v in self.t2i_hits.items()}


def retrieval(
    clip: ClipModel,
    images: SplitEmbeddings,
    split: str,
    batch_size: int,
    ks: list[int],
    chunk_size: int,
    label_field: str | None = None,
) -> RetrievalResult:
    """Recall@k both ways on `split`, per pair and (with `label_field`, a metadata column) per label, and the grid.

    Raises:
        ClipflowError: no sample of the split has `label_field` in its metadata.
    """
    pairs, image_embeddings = images(split)
    captions = [pairs.caption(i) for i in range(len(pairs))]
    texts = torch.cat([clip.encode_text(captions[s : s + batch_size]) for s in range(0, len(captions), batch_size)])
    check_rankable(texts, f"caption embeddings of split {split!r}")
    i2t_hits = recall_hits_at_k(image_embeddings, texts, ks, chunk_size=chunk_size)
    t2i_hits = recall_hits_at_k(texts, image_embeddings, ks, chunk_size=chunk_size)
    per_query = {"keys": list(pairs.index.keys), "i2t_hits": i2t_hits, "t2i_hits": t2i_hits}
    i2t, t2i = hit_rates(i2t_hits), hit_rates(t2i_hits)
    if label_field is None:
        # Without labels, equal captions are the only grouping: the grid frames pairs and others, nothing between.
        labels = torch.tensor(_ids(captions))
        return RetrievalResult(
            split, i2t, t2i, _grid(image_embeddings, texts, captions, labels, pairs, None), **per_query
        )
    labels = torch.tensor(_label_ids(pairs, label_field, split))
    return RetrievalResult(
        split,
        i2t,
        t2i,
        _grid(image_embeddings, texts, captions, labels, pairs, label_field),
        i2t_label=label_recall_at_k(image_embeddings, texts, labels, labels, ks, chunk_size),
        t2i_label=label_recall_at_k(texts, image_embeddings, labels, labels, ks, chunk_size),
        **per_query,
    )


def _ids(values: list) -> list[int]:
    """Equal values get equal integers, in order of first appearance."""
    index: dict = {}
    return [index.setdefault(value, len(index)) for value in values]


def _label_ids(pairs: ShardPairs, label_field: str, split: str) -> list[int]:
    values = [pairs.meta(i).get(label_field) for i in range(len(pairs))]
    if all(value is None for value in values):
        raise ClipflowError(
            f"no sample of split {split!r} has the label column {label_field!r} "
            "(evaluate.retrieval_label_field; null counts pairs only)"
        )
    # A sample without a label matches no other sample: a negative label of its own.
    ids = _ids(values)
    return [-1 - i if value is None else ids[i] for i, value in enumerate(values)]


def _grid(
    image_embeddings: torch.Tensor,
    texts: torch.Tensor,
    captions: list[str],
    labels: torch.Tensor,
    pairs: ShardPairs,
    label_field: str | None,
) -> RetrievalGrid:
    """The first few distinct captions as text queries, and the image of each as an image query.

    Identical captions tie exactly, so the image-to-text rows rank distinct captions: five copies
    of "a red circle" would fill a row and say nothing.
    """
    first: dict[str, int] = {}  # distinct caption -> its first sample
    caption_labels: dict[str, set[int]] = {}  # distinct caption -> the labels of its samples
    for i, (caption, label) in enumerate(zip(captions, labels.tolist(), strict=True)):
        first.setdefault(caption, i)
        caption_labels.setdefault(caption, set()).add(label)
    firsts = list(first.values())
    queries = firsts[:GRID_QUERIES]

    def relation(query: int, caption: str, same_label: bool) -> str:
        if caption == captions[query]:
            return PAIR
        return SAME_LABEL if same_label else OTHER

    text_to_image, image_to_text = [], []
    to_images = _top(texts[queries] @ image_embeddings.T, list(range(len(captions))))  # (Q, N) scores
    to_captions = _top(image_embeddings[queries] @ texts[firsts].T, firsts)  # (Q, distinct captions)
    for query, images, texts_found in zip(queries, to_images, to_captions, strict=True):
        found = [
            Retrieved(pairs.image(j), j, rank, score, relation(query, captions[j], bool(labels[j] == labels[query])))
            for rank, score, j in images
        ]
        text_to_image.append(GridRow(captions[query], found))
        label = int(labels[query])
        found = [
            Retrieved(captions[j], j, rank, score, relation(query, captions[j], label in caption_labels[captions[j]]))
            for rank, score, j in texts_found
        ]
        image_to_text.append(GridRow(pairs.image(query), found))
    return RetrievalGrid(text_to_image, image_to_text, label_field)


def _top(scores: torch.Tensor, samples: list[int]) -> list[list[tuple[int, float, int]]]:
    """(rank, score, sample) of each row's `GRID_TOP_K` best candidates; column c of `scores` is `samples[c]`."""
    top = scores.topk(min(GRID_TOP_K, scores.shape[1]), dim=1)
    return [
        [(rank, score, samples[c]) for rank, (score, c) in enumerate(zip(values, columns, strict=True), start=1)]
        for values, columns in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
