"""The convergence verdict on synthetic held-out curves."""

import math

import pytest

from beyondlm.convergence import all_converged, verdict


def _curve(f, steps=100, every=10):
    return [(s, f(s)) for s in range(0, steps + 1, every)]


def test_flat_tail_converges():
    v = verdict(_curve(lambda s: 3.0 + 2.0 * math.exp(-s / 10)))  # L(70) − L(100) ≈ 0.002 nats
    assert v.converged and v.rel_improvement < 0.01 and v.best_step == 100 and v.n_evals == 11


def test_still_falling_is_not_converged():
    v = verdict(_curve(lambda s: 5.0 - 0.01 * s))  # −0.3 over the last quarter of 4.3 = 7%
    assert not v.converged
    assert v.rel_improvement == pytest.approx((5.0 - 0.7 - 4.0) / 4.3)


def test_rising_tail_is_converged_with_the_best_before_it():
    v = verdict(_curve(lambda s: 3.0 + 0.001 * (s - 40) ** 2))
    assert v.converged and v.best_step == 40 and v.rel_improvement == 0.0
    assert v.final_valid_loss > v.best_valid_loss


def test_threshold_is_relative_and_strict():
    curve = [(0, 10.0), (75, 2.0), (100, 2.0 * (1 - 0.011))]
    assert not verdict(curve).converged
    assert verdict(curve, tol=0.02).converged


def test_too_few_points_say_nothing():
    assert not verdict([]).converged
    assert not verdict([(100, 2.0)]).converged  # nothing before the last quarter's cut... and nothing after
    assert verdict([(100, 2.0)]).rel_improvement is None


def test_all_converged_needs_every_run():
    assert all_converged([{"converged": True}, {"converged": True}])
    assert not all_converged([{"converged": True}, {"converged": False}])
    assert not all_converged([{}])
    assert not all_converged([])
