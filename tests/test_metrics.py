"""Downstream metrics checked against independent computations."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion

from avssl.evaluate.metrics import accuracy, ccc, confusion_matrix, unweighted_average_recall


@pytest.mark.parametrize("seed", range(5))
def test_uar_and_accuracy_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 200)
    p = np.where(rng.random(200) < 0.4, y, rng.integers(0, 6, 200))
    assert unweighted_average_recall(y, p, 6) == pytest.approx(balanced_accuracy_score(y, p))
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p))
    assert (confusion_matrix(y, p, 6) == sk_confusion(y, p, labels=range(6))).all()


def _ccc_direct(x, y):
    # Lin (1989): rho_c = 2 s_xy / (s_x^2 + s_y^2 + (xbar - ybar)^2), population moments.
    n = len(x)
    xbar, ybar = sum(x) / n, sum(y) / n
    sxy = sum((a - xbar) * (b - ybar) for a, b in zip(x, y)) / n
    sx2 = sum((a - xbar) ** 2 for a in x) / n
    sy2 = sum((b - ybar) ** 2 for b in y) / n
    return 2 * sxy / (sx2 + sy2 + (xbar - ybar) ** 2)


@pytest.mark.parametrize("seed", range(5))
def test_ccc_matches_a_direct_formula(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=300)
    y = 0.6 * x + rng.normal(0.3, 0.5, size=300)
    assert ccc(x, y) == pytest.approx(_ccc_direct(list(x), list(y)), rel=1e-9)


def test_ccc_properties():
    x = np.linspace(-1, 1, 50)
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, -x) == pytest.approx(-1.0)
    assert ccc(x, x + 1.0) < 1.0  # a shift is penalised, unlike Pearson
    assert np.isnan(ccc([1.0], [1.0]))
