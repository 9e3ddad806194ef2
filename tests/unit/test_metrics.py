import pytest
import torch

from clipflow.evaluate.metrics import (
    ClassRecall,
    Confusion,
    classification_report,
    label_recall_at_k,
    per_class_recall,
    recall_at_k,
    row_normalised,
    top_confusions,
    wilson_interval,
    zeroshot_topk,
)
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


def _at_degrees(*angles):
    radians = torch.tensor(angles, dtype=torch.float64).deg2rad()
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_label_recall_counts_any_candidate_of_the_query_label():
    candidates = _at_degrees(0, 30, 60, 90)
    candidate_labels = torch.tensor([0, 1, 1, 0])
    # Nearest candidates first: q0 sees labels 0, 1, ...; q1 sees 0, 1; q2 sees 1, 1, 0; q3 sees 0 first.
    queries = _at_degrees(0, 90, 40, 10)
    query_labels = torch.tensor([1, 1, 0, 0])
    expected = {1: 1 / 4, 2: 3 / 4, 3: 1.0}
    for chunk_size in (1, 3, 1024):
        recall = label_recall_at_k(queries, candidates, query_labels, candidate_labels, [1, 2, 3], chunk_size)
        assert recall == pytest.approx(expected)
    # Pair-level recall is the special case where every pair is a label of its own.
    own = torch.arange(4)
    assert recall_at_k(queries, candidates, [1, 2, 3]) == label_recall_at_k(queries, candidates, own, own, [1, 2, 3])


def test_confusion_rows_are_normalised_and_read_per_class():
    confusion = torch.tensor([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    shares = row_normalised(confusion)
    assert shares.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]]
    # Class "b" has no images: it has no recall, and its row stays empty instead of dividing by zero.
    assert per_class_recall(confusion, ["a", "b", "c"]) == [
        ClassRecall("a", samples=4, recall=0.5, confused_with="b", confused_share=0.5),
        ClassRecall("c", samples=4, recall=0.75, confused_with="a", confused_share=0.25),
    ]
    assert top_confusions(confusion, ["a", "b", "c"], limit=5) == [
        Confusion("a", "b", count=2, share=0.5),
        Confusion("c", "a", count=1, share=0.25),
    ]
    assert top_confusions(confusion, ["a", "b", "c"], limit=1) == [Confusion("a", "b", count=2, share=0.5)]
    perfect = per_class_recall(torch.tensor([[3, 0], [0, 1]]), ["a", "b"])
    assert [(each.recall, each.confused_with) for each in perfect] == [(1.0, None), (1.0, None)]


def test_wilson_interval_holds_the_estimate_and_matches_known_values():
    # As scipy.stats.binomtest(k, n).proportion_ci(method="wilson") gives them.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(19, 100) == pytest.approx((0.1251, 0.2778), abs=1e-4)
    for trials in (1, 7, 60, 1000):
        for successes in {0, 1, trials // 3, trials}:
            low, high = wilson_interval(successes, trials)
            assert 0.0 <= low <= successes / trials <= high <= 1.0
    # More scenes, a narrower interval around the same share.
    assert wilson_interval(200, 1000)[1] - wilson_interval(200, 1000)[0] < wilson_interval(2, 10)[1]
