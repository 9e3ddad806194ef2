"""The linear probe against scikit-learn's logistic regression, the CLIP paper's, on the same problem."""

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from clipflow.errors import ClipflowError
from clipflow.evaluate.linear_probe import fit_linear_probe


@pytest.fixture(scope="module")
def digits():
    features, labels = load_digits(return_X_y=True)
    features = torch.tensor(features / 16.0, dtype=torch.float32)
    labels = [f"digit {label}" for label in labels]
    return features[:1200], labels[:1200], features[1200:], labels[1200:]


def test_the_probe_solves_the_problem_scikit_learn_solves_and_answers_as_it_does(digits):
    train, train_labels, test, test_labels = digits
    l2 = 1e-3
    probe = fit_linear_probe(train, train_labels, [l2], max_iter=500)
    ours = probe.top1_hits(test, test_labels)
    # sklearn's loss is 0.5 |W|^2 + C sum(CE), ours mean(CE) + l2 |W|^2: the same minimum at C = 1 / (2 N l2).
    reference = LogisticRegression(C=1 / (2 * len(train_labels) * l2), max_iter=5000).fit(train.numpy(), train_labels)
    theirs = torch.tensor(reference.predict(test.numpy()) == test_labels)
    assert probe.l2 == l2 and probe.samples == len(train_labels) and probe.classes == sorted(set(train_labels))
    assert ours.float().mean().item() > 0.9
    assert (ours == theirs).float().mean().item() >= 0.98
    assert ours.float().mean().item() == pytest.approx(theirs.float().mean().item(), abs=0.01)


def test_the_penalty_is_chosen_on_held_back_images_and_an_unseen_label_is_a_miss(digits):
    train, train_labels, test, _ = digits
    probe = fit_linear_probe(train, train_labels, [1e-4, 1e-2, 100.0], max_iter=200)
    assert set(probe.validation_top1) == {1e-4, 1e-2, 100.0}
    # a penalty that flattens every weight leaves one class for all: far below the others on the held-back fifth
    assert probe.validation_top1[100.0] < 0.3 < 0.9 < probe.validation_top1[probe.l2]
    assert probe.l2 != 100.0
    assert not probe.top1_hits(test[:5], ["a label it never saw"] * 5).any()


@pytest.mark.parametrize(
    ("labels", "message"),
    [(["a"] * 9, "at least 10 images of at least 2 labels, got 9 of 1"), (["a"] * 20, "got 20 of 1")],
)
def test_too_few_images_or_one_label_is_a_clear_error(labels, message):
    with pytest.raises(ClipflowError, match=message):
        fit_linear_probe(torch.randn(len(labels), 4), labels, [1e-3], max_iter=10)
