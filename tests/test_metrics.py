"""Hand-computed checks of the distributional estimators and the text metrics."""

import math

import numpy as np
import pytest

from beyondlm.metrics import (
    Estimate,
    distinct_n,
    forward_kl,
    mean_estimate,
    mean_length,
    per_token,
    perplexity,
    rep_n,
    reverse_kl,
    sample_metrics,
    token_repetition,
    total_variation,
)

# --- distributional -------------------------------------------------------------------------


def test_mean_estimate_by_hand():
    # [1, 2, 3]: mean 2, sample std (ddof=1) = sqrt((1+0+1)/2) = 1, stderr = 1/sqrt(3)
    est = mean_estimate(np.array([1.0, 2.0, 3.0]))
    assert est == Estimate(mean=2.0, stderr=pytest.approx(1 / math.sqrt(3)), n=3)
    assert mean_estimate(np.array([5.0])) == Estimate(5.0, 0.0, 1)


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan]), np.array([1.0, -np.inf])])
def test_mean_estimate_rejects_empty_and_nonfinite(bad):
    with pytest.raises(ValueError):
        mean_estimate(bad)


def test_to_dict_keys():
    assert Estimate(1.5, 0.5, 2).to_dict("fkl") == {"fkl": 1.5, "fkl_se": 0.5, "fkl_n": 2}


def test_forward_kl_by_hand():
    # log-ratios log p_d − log p_θ = [-1 − (−2), −2 − (−4)] = [1, 2]: mean 1.5,
    # std(ddof=1) = sqrt(0.25 + 0.25) = 1/sqrt(2), stderr = (1/sqrt 2)/sqrt 2 = 0.5
    est = forward_kl(np.array([-1.0, -2.0]), np.array([-2.0, -4.0]))
    assert (est.mean, est.stderr, est.n) == (1.5, pytest.approx(0.5), 2)


def test_forward_kl_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        forward_kl(np.zeros(2), np.zeros(3))


def test_reverse_kl_reports_impossible_fraction():
    # model log-probs all −1; data log-probs [−2, −inf, −3, −1] → finite ratios [1, 2, 0], mean 1;
    # one of four samples impossible → 0.25
    est, frac = reverse_kl(np.full(4, -1.0), np.array([-2.0, -np.inf, -3.0, -1.0]))
    assert (est.mean, est.n, frac) == (1.0, 3, 0.25)
    assert est.stderr == pytest.approx(1 / math.sqrt(3))  # std of [1, 2, 0] is 1


def test_reverse_kl_all_impossible_gives_none():
    assert reverse_kl(np.zeros(2), np.full(2, -np.inf)) == (None, 1.0)


def test_total_variation_by_hand():
    # p_θ = [1/2, 1/4, 1/4], p_d = [1/4, 1/2, 0]: values max(0, 1 − ratio) = [1 − 1/2, 0, 1]
    est = total_variation(np.log([0.5, 0.25, 0.25]), np.array([math.log(0.25), math.log(0.5), -np.inf]))
    assert est.mean == pytest.approx(0.5)


def test_total_variation_extreme_log_ratios_are_stable():
    # ratio e^{+1000} must not overflow (value 0); ratio e^{-1e5} underflows cleanly to value 1
    est = total_variation(np.array([-1000.0, -10.0]), np.array([0.0, -1e5]))
    assert est.mean == 0.5 and np.isfinite(est.stderr)


def test_monte_carlo_estimators_match_exact_values():
    # Two distributions on 4 outcomes; estimates from 20k samples must be within 5 stderr of truth.
    rng = np.random.default_rng(0)
    p_d = np.array([0.4, 0.3, 0.2, 0.1])
    p_m = np.array([0.25, 0.25, 0.25, 0.25])
    x_d, x_m = rng.choice(4, 20_000, p=p_d), rng.choice(4, 20_000, p=p_m)
    fkl = forward_kl(np.log(p_d[x_d]), np.log(p_m[x_d]))
    rkl, frac = reverse_kl(np.log(p_m[x_m]), np.log(p_d[x_m]))
    tvd = total_variation(np.log(p_m[x_m]), np.log(p_d[x_m]))
    assert abs(fkl.mean - np.sum(p_d * np.log(p_d / p_m))) < 5 * fkl.stderr
    assert abs(rkl.mean - np.sum(p_m * np.log(p_m / p_d))) < 5 * rkl.stderr and frac == 0.0
    assert abs(tvd.mean - 0.5 * np.abs(p_d - p_m).sum()) < 5 * tvd.stderr


def test_perplexity_and_per_token():
    assert perplexity(4 * math.log(2), 2) == pytest.approx(4.0)  # exp(2 ln 2)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    assert per_token(Estimate(3.0, 1.5, 10), 3.0) == Estimate(1.0, 0.5, 10)


# --- text -----------------------------------------------------------------------------------

SEQS = [[1, 2, 1, 2], [3, 3, 3]]


def test_distinct_n_by_hand():
    # bigrams: (1,2) (2,1) (1,2) | (3,3) (3,3) → 3 unique of 5
    assert distinct_n(SEQS, 2) == pytest.approx(3 / 5)
    # unigrams: 7 tokens, unique {1, 2, 3}
    assert distinct_n(SEQS, 1) == pytest.approx(3 / 7)
    assert distinct_n([[1]], 2) == 0.0


def test_rep_n_by_hand():
    # seq 1: 2 unique of 3 bigrams → 1 − 2/3 = 1/3; seq 2: 1 unique of 2 → 1/2; mean = 5/12
    assert rep_n(SEQS, 2) == pytest.approx(5 / 12)
    # [7] has no bigram and is skipped: only [1,1,1] counts (1 − 1/2), not (0.5 + 0)/2
    assert rep_n([[1, 1, 1], [7]], 2) == pytest.approx(0.5)
    assert rep_n([[7]], 2) == 0.0


def test_token_repetition_by_hand():
    # window 32: seq 1 positions 2, 3 repeat (1 and 2 seen); seq 2 positions 1, 2 repeat → 4/7
    assert token_repetition(SEQS) == pytest.approx(4 / 7)
    # window 1: only an immediate repeat counts: seq 1 none, seq 2 positions 1, 2 → 2/7
    assert token_repetition(SEQS, window=1) == pytest.approx(2 / 7)
    # windows do not cross sequences: [5] then [5] has no repeat
    assert token_repetition([[5], [5]]) == 0.0


def test_mean_length_and_sample_metrics():
    assert mean_length(SEQS) == 3.5  # (4 + 3) / 2
    m = sample_metrics(SEQS)
    assert list(m) == ["distinct_2", "rep_2", "distinct_3", "rep_3", "distinct_4", "rep_4", "tr_32", "mean_length"]
    assert m["rep_2"] == pytest.approx(5 / 12) and m["tr_32"] == pytest.approx(4 / 7)
    # trigrams: (1,2,1) (2,1,2) | (3,3,3) → 3 unique of 3; 4-grams: only (1,2,1,2) → 1 of 1
    assert m["distinct_3"] == 1.0 and m["distinct_4"] == 1.0
    assert sample_metrics([])["mean_length"] == 0.0
