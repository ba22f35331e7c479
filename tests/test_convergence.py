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
    v = verdict(_curve(lambda s: 5.0 - 0.01 * s))  # 0.3 of the run's 1.0 came in the last quarter
    assert not v.converged
    assert v.rel_improvement == pytest.approx((4.3 - 4.0) / (5.0 - 4.0))


def test_a_loss_that_barely_moves_is_judged_by_its_own_progress():
    """A weighted objective moving in the second decimal (MixCE-like): 15% of its small progress
    in the last quarter is not convergence, although it is 0.7% of the loss value."""
    v = verdict(_curve(lambda s: 0.46 - 0.02 * (1 - math.exp(-s / 200))))
    assert not v.converged and v.rel_improvement > 0.1


def test_rising_tail_is_converged_with_the_best_before_it():
    v = verdict(_curve(lambda s: 3.0 + 0.001 * (s - 40) ** 2))
    assert v.converged and v.best_step == 40 and v.rel_improvement == 0.0
    assert v.final_valid_loss > v.best_valid_loss


def test_threshold_is_relative_and_strict():
    curve = [(0, 3.0), (75, 2.0), (100, 2.0 - 0.0111)]  # 1.1% of the run's improvement
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
