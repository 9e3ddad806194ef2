"""classify and rank, the arithmetic behind the served endpoints, on a random-init CLIP-Tiny without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipflow import model as clip_model
from clipflow.serve.encoder import CandidateScore, Encoder, LabelScore, classify, rank

LABELS = ["red circle", "blue square", "green star", "purple triangle", "white hexagon"]
TEMPLATES = ["a {}.", "a drawing of a {}."]
TEXTS = ["a red circle", "two blue squares", "a green star on the left"]
COLORS = ("red", "blue", "green", "purple")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    return Encoder(clip)


def _images(colors=COLORS) -> list[Image.Image]:
    # Not flat colours only: a pattern per image, so the embeddings differ in more than one direction.
    rng = np.random.default_rng(0)
    images = []
    for color in colors:
        image = Image.new("RGB", (64, 64), color)
        noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        images.append(Image.blend(image, noise, 0.3))
    return images


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_the_encoder_scales_by_the_models_own_temperature(encoder):
    assert encoder.logit_scale == pytest.approx(encoder.clip.model.logit_scale.exp().item())
    assert encoder.logit_scale > 1


def test_classify_gives_every_label_once_most_probable_first_with_probabilities_that_sum_to_one(encoder):
    image_features = encoder.images(_images()[:1])  # (1, D)
    label_features = encoder.labels(LABELS, TEMPLATES)  # (L, D)
    scores = classify(image_features, label_features, LABELS, encoder.logit_scale)

    assert all(isinstance(score, LabelScore) for score in scores)
    assert sorted(score.label for score in scores) == sorted(LABELS)
    assert math.fsum(score.probability for score in scores) == pytest.approx(1.0, abs=1e-6)
    probabilities = [score.probability for score in scores]
    assert probabilities == sorted(probabilities, reverse=True)
    # The softmax is monotone: the order is the cosines' order too.
    cosines = [score.cosine for score in scores]
    assert cosines == sorted(cosines, reverse=True)
    # Each label's cosine and probability, computed here independently.
    expected_cosines = dict(zip(LABELS, (label_features @ image_features[0]).tolist(), strict=True))
    expected = dict(zip(LABELS, _softmax([encoder.logit_scale * c for c in expected_cosines.values()]), strict=True))
    for score in scores:
        assert score.cosine == pytest.approx(expected_cosines[score.label], abs=1e-6)
        assert score.probability == pytest.approx(expected[score.label], rel=1e-5)


def test_classify_answers_what_the_service_computed_before_it_moved_here(encoder):
    image_features = encoder.images(_images()[1:2])
    label_features = encoder.labels(LABELS, TEMPLATES)
    # serving/service.py's expression, verbatim, before classify existed.
    probabilities = (encoder.logit_scale * image_features @ label_features.T).softmax(dim=-1)[0].tolist()
    before = sorted(zip(LABELS, probabilities, strict=True), key=lambda pair: pair[1], reverse=True)

    scores = classify(image_features, label_features, LABELS, encoder.logit_scale)
    assert [(score.label, score.probability) for score in scores] == before
    # A (D,) embedding is the same image.
    assert classify(image_features[0], label_features, LABELS, encoder.logit_scale) == scores


def test_a_label_whose_embedding_is_the_images_own_comes_first(encoder):
    image_features = encoder.images(_images()[2:3])
    label_features = torch.cat([encoder.labels(LABELS, TEMPLATES), image_features])  # (L + 1, D)
    labels = [*LABELS, "the image itself"]
    scores = classify(image_features, label_features, labels, encoder.logit_scale)
    assert scores[0].label == "the image itself"
    assert scores[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert all(score.cosine < scores[0].cosine for score in scores[1:])


def test_classify_keeps_the_labels_order_among_equal_probabilities_and_one_label_is_certain(encoder):
    # Exact features, so that equal cosines are equal to the last bit.
    image = torch.tensor([[0.6, 0.8, 0.0]])
    labels = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tied = classify(image, labels, ["none", "b1", "a", "b2"], encoder.logit_scale)
    assert [score.label for score in tied] == ["b1", "b2", "a", "none"]
    assert [score.cosine for score in tied] == pytest.approx([0.8, 0.8, 0.6, 0.0])
    assert tied[0].probability == tied[1].probability

    image_features = encoder.images(_images()[:1])
    (only,) = classify(image_features, encoder.labels(["red circle"], TEMPLATES), ["red circle"], encoder.logit_scale)
    assert only.label == "red circle" and only.probability == pytest.approx(1.0)


def test_rank_orders_each_querys_candidates_by_their_dot_products(encoder):
    queries = encoder.texts(TEXTS)  # (Q, D)
    candidates = encoder.images(_images())  # (C, D)
    ranked = rank(queries, candidates, encoder.logit_scale)

    dots = queries.double().numpy() @ candidates.double().numpy().T  # (Q, C), computed apart
    assert len(ranked) == len(TEXTS)
    for q, row in enumerate(ranked):
        assert all(isinstance(match, CandidateScore) for match in row)
        assert [match.index for match in row] == np.argsort(-dots[q], kind="stable").tolist()
        for match in row:
            assert match.cosine == pytest.approx(dots[q, match.index], abs=1e-5)
        probabilities = [match.probability for match in row]
        assert math.fsum(probabilities) == pytest.approx(1.0, abs=1e-6)
        assert probabilities == sorted(probabilities, reverse=True)
        expected = _softmax([encoder.logit_scale * d for d in dots[q]])
        assert probabilities == pytest.approx([expected[match.index] for match in row], rel=1e-4)


def test_rank_answers_what_the_service_computed_before_it_moved_here(encoder):
    queries = encoder.images(_images())
    candidates = encoder.texts(TEXTS)
    # serving/service.py's _rank, verbatim, before rank existed.
    cosines = queries @ candidates.T
    probabilities = (encoder.logit_scale * cosines).softmax(dim=-1)
    order = probabilities.argsort(dim=-1, descending=True)
    before = [
        [(c, cosines[q, c].item(), probabilities[q, c].item()) for c in row] for q, row in enumerate(order.tolist())
    ]
    ranked = rank(queries, candidates, encoder.logit_scale)
    assert [[(m.index, m.cosine, m.probability) for m in row] for row in ranked] == before


def test_rank_with_one_candidate_gives_it_all_the_probability(encoder):
    queries = encoder.texts(TEXTS)
    candidate = encoder.images(_images()[:1])
    ranked = rank(queries, candidate, encoder.logit_scale)
    assert [[match.index for match in row] for row in ranked] == [[0], [0], [0]]
    assert all(row[0].probability == pytest.approx(1.0) for row in ranked)
    assert [row[0].cosine for row in ranked] == pytest.approx((queries @ candidate.T)[:, 0].tolist(), abs=1e-6)


def test_rank_puts_equal_candidates_together_in_candidate_order(encoder):
    # Exact features: candidates 1 and 3 are the same image, 0 and 2 the same other one.
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ranked = rank(queries, candidates, encoder.logit_scale)
    assert [[match.index for match in row] for row in ranked] == [[1, 3, 0, 2], [0, 2, 1, 3]]
    for row in ranked:
        assert [match.cosine for match in row] == [1.0, 1.0, 0.0, 0.0]
        assert row[0].probability == row[1].probability > row[2].probability == row[3].probability


def test_a_larger_logit_scale_sharpens_rank_without_reordering_it(encoder):
    queries, candidates = encoder.texts(TEXTS), encoder.images(_images())
    soft = rank(queries, candidates, 1.0)
    sharp = rank(queries, candidates, 100.0)
    for soft_row, sharp_row in zip(soft, sharp, strict=True):
        assert [m.index for m in soft_row] == [m.index for m in sharp_row]
        assert sharp_row[0].probability > soft_row[0].probability
