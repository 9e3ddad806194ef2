"""Zero-shot classification and retrieval metrics over embeddings.

All functions take L2-normalised embeddings, so a dot product is a cosine similarity.
Retrieval works in chunks of rows: the N x N similarity matrix never exists in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    if queries.shape != candidates.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} must pair up")
    hits = torch.zeros(len(ks), queries.shape[0], dtype=torch.bool)
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start : start + chunk_size]
        scores = block @ candidates.T  # (chunk, N)
        own = torch.arange(start, start + block.shape[0])[:, None]
        for row, k in enumerate(ks):
            # One topk per k, as CLIP_benchmark calls it: the first k of a larger topk may keep other members of a tie.
            top = scores.topk(min(k, candidates.shape[0]), dim=1).indices
            hits[row, start : start + block.shape[0]] = (top == own).any(dim=1)
    return {k: hits[row].float().mean().item() for row, k in enumerate(ks)}


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
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1).float().mean().item()
