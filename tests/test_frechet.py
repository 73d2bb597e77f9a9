"""The classifier Fréchet distance (issue 15, item 4): closed forms, its estimator, and the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfm.data import dequantise, get_dataset
from fastfm.evaluation.frechet import (accuracy, classifier_frechet_distance, feature_stats, frechet_distance,
                            train_classifier)


def test_closed_form_of_commuting_gaussians():
    """Diagonal covariances: FD = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 3.0, 7), rng.uniform(0.2, 3.0, 7)
    m1, m2 = rng.normal(size=7), rng.normal(size=7)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_closed_form_of_a_rotated_pair():
    """Non-diagonal: S2 = c^2 S1 (commuting) gives tr S1 (1 - c)^2; the distance is symmetric, zero on itself."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, 5))
    s1 = q @ q.T + 0.1 * np.eye(5)
    m = rng.normal(size=5)
    assert frechet_distance(m, s1, m, 4.0 * s1) == pytest.approx(np.trace(s1), rel=1e-8)
    s2 = np.diag(rng.uniform(0.5, 2.0, 5))
    assert frechet_distance(m, s1, m + 1, s2) == pytest.approx(frechet_distance(m + 1, s2, m, s1), rel=1e-8)
    assert abs(frechet_distance(m, s1, m, s1)) < 1e-8


def test_estimate_from_samples_and_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=gen)
    y = 2.0 + 3.0 * torch.randn(20000, 3, generator=gen)
    # exact: 3 * 2^2 + 3 * (1 - 3)^2 = 24
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(24.0, rel=0.03)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.zeros(1, 4))


def test_digit_classifier_learns_and_separates_real_from_noise():
    data = get_dataset("digits")
    train = dequantise(data.train, data.levels, torch.Generator().manual_seed(0))  # model space, as samples are
    model = train_classifier(train, data.train_labels, 10, steps=300, progress=False)
    assert accuracy(model, data.test, data.test_labels) > 0.9
    real = classifier_frechet_distance(model, data.test[:90], data.test[90:])
    noise = classifier_frechet_distance(model, torch.rand_like(data.test[:90]) * 2 - 1, data.test[90:])
    assert real < 0.2 * noise
