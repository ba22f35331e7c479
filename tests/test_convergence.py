"""The convergence verdict on synthetic held-out curves."""

import math

import pytest

from beyondlm.convergence import HeldOutValue, all_converged, paired_se, verdict


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


def _chunked(curve, per_chunk_noise, jitter_noise, rng, k=40):
    """Each evaluation as k equal chunks of 10 units: the true loss plus chunk noise that is the
    same at every step (the same held-out texts) plus a per-evaluation jitter (the model's loss
    on each text moves between evaluations, not only the mean)."""
    fixed = rng.normal(0.0, per_chunk_noise, k)
    out = {}
    for step, loss in curve:
        jitter = rng.normal(0.0, jitter_noise, k)
        out[step] = HeldOutValue.from_chunks([10 * (loss + f + j) for f, j in zip(fixed, jitter)], [10.0] * k)
    return out


def test_paired_se_of_identical_chunks_is_zero_and_of_a_shift_too():
    a = HeldOutValue.from_chunks([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    b = HeldOutValue.from_chunks([0.5, 1.5, 2.5], [1.0, 1.0, 1.0])  # every chunk 0.5 lower
    assert paired_se(a, a) == 0.0 and paired_se(a, b) == pytest.approx(0.0, abs=1e-12)
    assert a.value - b.value == pytest.approx(0.5)
    c = HeldOutValue.from_chunks([1.0, 1.0], [1.0, 1.0])
    d = HeldOutValue.from_chunks([0.0, 1.0], [1.0, 1.0])  # differences 1, 0: mean 0.5, SE 0.5
    assert paired_se(c, d) == pytest.approx(math.sqrt(2 / 1 * (0.25 + 0.25)) / 2)
    assert math.isnan(paired_se(HeldOutValue.from_chunks([1.0], [1.0]), HeldOutValue.from_chunks([0.0], [1.0])))


def test_a_tail_gain_within_evaluation_noise_is_converged():
    """A DPO-like curve: 0.69 → 0.53, then a 0.006 wiggle that the held-out pairs cannot resolve.
    The 1% rule alone (0.0016) would call it unconverged."""
    import numpy as np

    curve = _curve(lambda s: 0.53 + 0.16 * math.exp(-s / 15) - (0.006 if s == 100 else 0.0))
    chunks = _chunked(curve, 0.3, 0.02, np.random.default_rng(0))
    curve = [(s, c.value) for s, c in chunks.items()]
    plain, noisy = verdict(curve), verdict(curve, chunks=chunks)
    assert not plain.converged and plain.noise is None
    assert noisy.converged and noisy.gain <= noisy.noise and noisy.rel_improvement > 0.01


def test_a_clear_tail_gain_is_not_excused_by_noise():
    import numpy as np

    curve = _curve(lambda s: 5.0 - 0.01 * s)
    chunks = _chunked(curve, 0.3, 0.02, np.random.default_rng(1))
    v = verdict([(s, c.value) for s, c in chunks.items()], chunks=chunks)
    assert not v.converged and v.gain > v.noise > 0
