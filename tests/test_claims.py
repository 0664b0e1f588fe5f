"""The claims' verdict rule and the overfitting-gap interval, on hand-made intervals and data."""

import numpy as np

from avssl.evaluate.claims import CONTRADICTED, NOT_RUN, SUPPORTED, UNRESOLVED, gap_difference, verdict_of
from avssl.evaluate.stats import Interval


def iv(est, lo, hi):
    return Interval(est, lo, hi, 0.95, 1000, "test")


def test_a_claim_is_supported_only_when_every_primary_difference_is_resolved_in_its_favour():
    up, flat, down = iv(0.1, 0.02, 0.2), iv(0.05, -0.01, 0.1), iv(-0.1, -0.2, -0.03)
    assert verdict_of([("a", up), ("b", up)], 2) == SUPPORTED
    assert verdict_of([("a", up), ("b", flat)], 2) == UNRESOLVED
    assert verdict_of([("a", up), ("b", down)], 2) == CONTRADICTED
    assert verdict_of([("a", up)], 2) == UNRESOLVED  # half of the evidence is missing
    assert verdict_of([("a", down)], 2) == CONTRADICTED
    assert verdict_of([], 1) == NOT_RUN


def test_gap_difference_resolves_a_clear_gap_and_not_noise():
    rng = np.random.default_rng(0)
    clear = gap_difference(rng.normal(0.4, 0.03, 5), rng.normal(0.1, 0.03, 5))
    assert clear.resolved and clear.direction > 0 and clear.low < 0.3 < clear.high
    covered = [gap_difference(rng.normal(0.2, 0.1, 5), rng.normal(0.2, 0.1, 5), n_boot=500, seed=k).contains(0.0) for k in range(100)]
    assert np.mean(covered) > 0.8  # no gap: the interval mostly contains 0 (5 seeds: a little short of 95 %)
