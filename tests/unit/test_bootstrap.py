"""The paired bootstrap of a difference of accuracies over the same items."""

import numpy as np
import pytest

from clipflow.registry.bootstrap import paired_bootstrap


def test_the_interval_covers_the_true_difference_at_about_its_level():
    # Two models with true accuracies 0.70 and 0.65 over 400 items: the 90% interval holds the true
    # difference of 0.05 in about 90 of 100 draws of the items.
    rng = np.random.default_rng(1)
    covered = 0
    for draw in range(100):
        candidate = rng.random(400) < 0.70
        reference = rng.random(400) < 0.65
        result = paired_bootstrap(candidate, reference, samples=500, confidence=0.9, seed=draw)
        assert result.low <= result.difference <= result.high
        covered += result.low <= 0.05 <= result.high
    assert 80 <= covered <= 98


def test_identical_vectors_differ_by_zero_with_a_zero_width_interval():
    hits = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
    result = paired_bootstrap(hits, hits.copy(), samples=200, confidence=0.95)
    assert (result.difference, result.low, result.high, result.items) == (0.0, 0.0, 0.0, 10)


def test_a_clear_difference_lies_outside_the_noise_and_a_small_one_inside():
    rng = np.random.default_rng(0)
    reference = rng.random(300) < 0.5
    better = reference | (rng.random(300) < 0.4)  # fixes about 40% of the misses, breaks nothing
    clear = paired_bootstrap(better, reference, samples=1000, confidence=0.95)
    assert clear.low > 0.1
    # one item of 300 changed: a difference of 1/300, well inside the noise
    nudged = reference.copy()
    nudged[np.flatnonzero(~reference)[0]] = True
    small = paired_bootstrap(nudged, reference, samples=1000, confidence=0.95)
    assert small.difference == pytest.approx(1 / 300) and small.low <= 0.0


def test_the_same_seed_gives_the_same_interval_and_the_level_widens_it():
    rng = np.random.default_rng(2)
    candidate, reference = rng.random(250) < 0.6, rng.random(250) < 0.55
    first = paired_bootstrap(candidate, reference, samples=300, confidence=0.95, seed=7)
    assert paired_bootstrap(candidate, reference, samples=300, confidence=0.95, seed=7) == first
    narrower = paired_bootstrap(candidate, reference, samples=300, confidence=0.5, seed=7)
    assert first.low < narrower.low <= narrower.high < first.high


def test_more_resamples_than_one_chunk_holds_are_drawn_in_chunks():
    # 40,000 items make a chunk of 100 resamples: 1,000 resamples come in ten.
    rng = np.random.default_rng(3)
    candidate, reference = rng.random(40_000) < 0.5, rng.random(40_000) < 0.5
    result = paired_bootstrap(candidate, reference, samples=1000, confidence=0.95)
    assert result.low < result.difference < result.high and result.high - result.low < 0.03


def test_unpaired_vectors_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(np.ones(3), np.ones(4), samples=10, confidence=0.9)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(np.ones(0), np.ones(0), samples=10, confidence=0.9)
