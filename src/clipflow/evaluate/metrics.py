"""Zero-shot classification, retrieval and probe metrics.

Functions over embeddings take them L2-normalised, so a dot product is a cosine similarity.
Retrieval works in chunks of rows: the N x N similarity matrix never exists in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The normal quantile of a two-sided 95% interval.
Z_95 = 1.959964


def zeroshot_topk(
    image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, targets: torch.Tensor, k: int = 1
) -> float:
    """Fraction of images whose true class is among the k most similar class embeddings."""
    return zeroshot_topk_from_scores(image_embeddings @ class_embeddings.T, targets, k)


def recall_at_k(
    queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int], chunk_size: int = 1024
) -> dict[int, float]:
    """Recall@k when query i's one correct candidate is candidate i, as LAION's CLIP_benchmark counts it.

    Query i is a hit at k when candidate i is among `torch.topk` of its k best scores. Candidates
    that score the same (identical captions) are ranked as `torch.topk` ranks them, so a tie counts
    only where topk keeps the paired one, never for every candidate in it. Scores are computed chunk
    by chunk, so memory is O(chunk_size x N).
    """
    return hit_rates(recall_hits_at_k(queries, candidates, ks, chunk_size))


def recall_hits_at_k(
    queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int], chunk_size: int = 1024
) -> dict[int, torch.Tensor]:
    """`recall_at_k` per query: k -> (Q,) bool, whether query i found its pair in its k best."""
    if queries.shape != candidates.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} must pair up")
    # Each pair is a label of its own: only candidate i carries query i's.
    own = torch.arange(queries.shape[0])
    return label_hits_at_k(queries, candidates, own, own, ks, chunk_size)


def label_recall_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Recall@k when every candidate with the query's label is correct, not only its pair.

    Query i is a hit at k when one of `torch.topk` of its k best scores is a candidate whose label
    equals `query_labels[i]`. Labels are integers, (Q,) and (N,); memory is O(chunk_size x N).
    """
    return hit_rates(label_hits_at_k(queries, candidates, query_labels, candidate_labels, ks, chunk_size))


def hit_rates(hits: dict[int, torch.Tensor]) -> dict[int, float]:
    """k -> the share of hits in each (Q,) bool vector."""
    return {k: each.float().mean().item() for k, each in hits.items()}


def label_hits_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """`label_recall_at_k` per query: k -> (Q,) bool, whether query i found its label in its k best."""
    hits = torch.zeros(len(ks), queries.shape[0], dtype=torch.bool)
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start : start + chunk_size]
        scores = block @ candidates.T  # (chunk, N)
        wanted = query_labels[start : start + block.shape[0], None]
        for row, k in enumerate(ks):
            # One topk per k, as CLIP_benchmark calls it: the first k of a larger topk may keep other members of a tie.
            top = scores.topk(min(k, candidates.shape[0]), dim=1).indices
            hits[row, start : start + block.shape[0]] = (candidate_labels[top] == wanted).any(dim=1)
    return {k: hits[row] for row, k in enumerate(ks)}


def classification_report(scores: torch.Tensor, targets: torch.Tensor, top_k: int = 5) -> dict:
    """Top-1, top-k and mean per-class recall of class scores (N, C), and the confusion matrix.

    `mean_per_class_recall` averages the recall of the classes that occur in `targets`, as
    CLIP_benchmark does; the confusion matrix counts (true class, predicted class), (C, C).
    """
    num_classes = scores.shape[1]
    predictions = scores.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
    present = confusion.sum(dim=1) > 0
    per_class = confusion.diag()[present].float() / confusion.sum(dim=1)[present].float()
    return {
        "acc1": zeroshot_topk_from_scores(scores, targets, 1),
        f"acc{top_k}": zeroshot_topk_from_scores(scores, targets, top_k),
        "mean_per_class_recall": per_class.mean().item(),
        "confusion": confusion,
    }


def zeroshot_topk_from_scores(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    return topk_hits(scores, targets, k).float().mean().item()


def topk_hits(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether row i's true class `targets[i]` is among the k best of its class scores (N, C)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def row_normalised(confusion: torch.Tensor) -> torch.Tensor:
    """Each row of a (true, predicted) count matrix as shares of that true class; rows without images stay 0."""
    totals = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    return confusion.double() / totals


@dataclass(frozen=True)
class ClassRecall:
    """One true class of a zero-shot set: how many of its images were classified right, and its worst mix-up."""

    label: str
    samples: int
    recall: float
    confused_with: str | None  # the wrong class its images went to most often; None when none went wrong
    confused_share: float  # of its images that went there


def per_class_recall(confusion: torch.Tensor, classes: list[str]) -> list[ClassRecall]:
    """Recall of each class that has images, in class order, from a (true, predicted) count matrix."""
    shares = row_normalised(confusion)
    wrong = shares.clone().fill_diagonal_(0)
    result = []
    for i in (confusion.sum(dim=1) > 0).nonzero().flatten().tolist():
        worst = int(wrong[i].argmax())
        mixed = wrong[i, worst].item() > 0
        result.append(
            ClassRecall(
                label=classes[i],
                samples=int(confusion[i].sum()),
                recall=shares[i, i].item(),
                confused_with=classes[worst] if mixed else None,
                confused_share=wrong[i, worst].item() if mixed else 0.0,
            )
        )
    return result


@dataclass(frozen=True)
class Confusion:
    """Images of class `true` that were classified as `predicted`."""

    true: str
    predicted: str
    count: int
    share: float  # of the true class's images


def top_confusions(confusion: torch.Tensor, classes: list[str], limit: int) -> list[Confusion]:
    """The `limit` most frequent wrong (true, predicted) pairs, most images first, then the larger share."""
    shares = row_normalised(confusion)
    pairs = [tuple(pair) for pair in (confusion.clone().fill_diagonal_(0) > 0).nonzero().tolist()]
    pairs.sort(key=lambda pair: (-int(confusion[pair]), -shares[pair].item(), pair))
    return [Confusion(classes[i], classes[j], int(confusion[i, j]), shares[i, j].item()) for i, j in pairs[:limit]]


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike the normal one it stays inside [0, 1] at small n."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    # At p = 0 or 1 a bound equals p exactly in theory, and rounding may leave it a hair on the wrong side.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
