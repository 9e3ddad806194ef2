import pytest
import torch

from clipflow.evaluate.metrics import classification_report, recall_at_k, zeroshot_topk
from clipflow.model import prompt_ensemble


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_zeroshot_on_embeddings_with_known_answers():
    classes = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # images 0 and 1 sit nearest their own class; image 2 is nearest class 0, second nearest class 2
    images = _unit([[0.9, 0.1, 0], [0, 1, 0.2], [0.8, 0, 0.6]])
    targets = torch.tensor([0, 1, 2])
    assert zeroshot_topk(images, classes, targets, k=1) == pytest.approx(2 / 3)
    assert zeroshot_topk(images, classes, targets, k=2) == 1.0


def test_class_embedding_is_renormalised_mean_of_template_embeddings():
    vectors = {"a x": [1.0, 0.0], "the x": [0.0, 1.0], "a y": [-1.0, 0.0], "the y": [-1.0, 0.0]}

    def encode(prompts):
        return _unit([vectors[p] for p in prompts])

    result = prompt_ensemble(encode, ["x", "y"], ["a {}", "the {}"])
    expected = _unit([[0.5, 0.5], [-1.0, 0.0]])
    assert torch.allclose(result, expected)


def test_recall_counts_rank_of_the_paired_candidate():
    queries = _unit([[1, 0], [0, 1], [1, 1]])
    # queries 0 and 1 score their own pair highest; query 2 scores its pair last of three
    candidates = _unit([[1, 0.1], [1, 0.5], [-1, -1]])
    recall = recall_at_k(queries, candidates, ks=[1, 2, 3])
    assert recall == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})


def _dense_topk_recall(queries, candidates, ks):
    """CLIP_benchmark's count on the whole N x N matrix: a hit when the own candidate is in torch.topk's k."""
    scores = queries @ candidates.T
    own = torch.arange(len(queries))[:, None]
    return {k: (scores.topk(k, dim=1).indices == own).any(dim=1).float().mean().item() for k in ks}


def test_chunked_recall_equals_dense_topk_computation_ties_included():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(500, 16, generator=generator), dim=-1)
    # Every fifth caption repeats the one before it, as identical captions do in the built-in data.
    texts[1::5] = texts[0::5]
    dense = _dense_topk_recall(images, texts, (1, 5, 10))
    assert recall_at_k(images, texts, [1, 5, 10], chunk_size=64) == dense
    assert recall_at_k(texts, images, [1, 5, 10], chunk_size=64) == _dense_topk_recall(texts, images, (1, 5, 10))
    assert 0 < dense[1] < dense[10] <= 1


def test_tied_candidates_count_once_each_not_all_as_hits():
    n, ks = 50, [1, 5, 10]
    # All embeddings equal: every score is exactly 1.0, and topk keeps k of the n tied candidates,
    # the same k for every query, so only those k queries find their own.
    same = torch.zeros(n, 8)
    same[:, 0] = 1.0
    recall = recall_at_k(same, same, ks, chunk_size=16)
    assert recall == pytest.approx({k: k / n for k in ks})
    assert recall == _dense_topk_recall(same, same, ks)


def test_classification_report_on_known_scores():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.0, 0.1, 0.9]])
    targets = torch.tensor([0, 1, 1, 2])
    report = classification_report(scores, targets, top_k=2)
    assert report["acc1"] == pytest.approx(0.75)
    assert report["acc2"] == pytest.approx(1.0)
    # class 1 is right once in two, classes 0 and 2 always
    assert report["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert report["confusion"].tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
