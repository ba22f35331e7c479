"""Hand-computed checks of the distributional estimators and the text metrics."""

import math

import numpy as np
import pytest

from beyondlm.metrics import (
    Estimate,
    conditional_reverse_kl,
    distinct_n,
    forward_kl,
    impossible_at_data_lengths,
    length_histogram,
    length_report,
    mean_estimate,
    mean_length,
    per_token,
    perplexity,
    ratio_estimate,
    rep_n,
    sample_metrics,
    token_repetition,
    total_variation,
    tvd_noise,
    tvd_of_counts,
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


def test_conditional_reverse_kl_by_hand():
    # model log-probs all −1; data log-probs [−2, −inf, −3, −1]: s = [1, 0, 1, 1], s·r = [1, 0, 2, 0]
    # a = 3/4, b = 3/4 → KL(q_A‖p_d) = a/b − log b = 1 − log(3/4); the old "mean over possible
    # samples" would be a/b = 1, i.e. KL + log q(A)
    rkl = conditional_reverse_kl(np.full(4, -1.0), np.array([-2.0, -np.inf, -3.0, -1.0]), np.array([2, 5, 3, 1]))
    assert rkl.cond.mean == pytest.approx(1 - math.log(0.75)) and rkl.cond.n == 4
    assert (rkl.impossible.mean, rkl.impossible.n) == (0.25, 4)
    # per token: (a − b log b)/c with c = mean(s·len) = (2 + 3 + 1)/4 = 1.5
    assert rkl.cond_per_token.mean == pytest.approx((0.75 - 0.75 * math.log(0.75)) / 1.5)
    keys = set(rkl.to_dict())
    assert {"reverse_kl_cond", "reverse_kl_cond_se", "reverse_kl_cond_per_token", "impossible_frac",
            "impossible_frac_se"} <= keys and "reverse_kl" not in keys


def test_conditional_reverse_kl_all_impossible_gives_none():
    rkl = conditional_reverse_kl(np.zeros(2), np.full(2, -np.inf))
    assert rkl.cond is None and rkl.impossible.mean == 1.0 and "reverse_kl_cond" not in rkl.to_dict()


# An enumerable toy: q over 5 strings, the last impossible under p_d; lengths 1..5 tokens.
Q = np.array([0.35, 0.25, 0.15, 0.15, 0.10])
P_D = np.array([0.40, 0.25, 0.20, 0.15, 0.0])
LENS = np.array([1, 2, 3, 4, 5])


def _exact_conditional_kl():
    q_a = Q[:4] / Q[:4].sum()  # q restricted to A = {p_d > 0}, renormalised
    kl = float(np.sum(q_a * np.log(q_a / P_D[:4])))
    return kl, kl / float(q_a @ LENS[:4])


def test_conditional_reverse_kl_matches_exact_toy_within_se():
    kl, kl_tok = _exact_conditional_kl()  # ≈ 0.0139 nats; log q(A) = log 0.9 ≈ −0.105
    x = np.random.default_rng(0).choice(5, 40_000, p=Q)
    with np.errstate(divide="ignore"):
        rkl = conditional_reverse_kl(np.log(Q[x]), np.log(P_D[x]), LENS[x])
    assert abs(rkl.cond.mean - kl) < 3 * rkl.cond.stderr
    assert abs(rkl.cond_per_token.mean - kl_tok) < 3 * rkl.cond_per_token.stderr
    assert abs(rkl.impossible.mean - 0.1) < 3 * rkl.impossible.stderr
    # the mean over possible samples alone estimates KL + log q(A) < 0 here
    ok = np.isfinite(np.log(np.where(P_D[x] > 0, P_D[x], np.nan)))
    assert np.mean(np.log(Q[x][ok]) - np.log(P_D[x][ok])) < 0 < rkl.cond.mean


def test_conditional_reverse_kl_not_negative_in_expectation_and_se_calibrated():
    kl, _ = _exact_conditional_kl()
    rng = np.random.default_rng(1)
    est = []
    for _ in range(300):
        x = rng.choice(5, 400, p=Q)
        with np.errstate(divide="ignore"):
            est.append(conditional_reverse_kl(np.log(Q[x]), np.log(P_D[x])).cond)
    means = np.array([e.mean for e in est])
    assert means.mean() > 0 and abs(means.mean() - kl) < 4 * means.std() / np.sqrt(len(means))
    # the delta-method SE matches the spread over replicates (within 20%)
    assert np.mean([e.stderr for e in est]) == pytest.approx(means.std(), rel=0.2)


def test_ratio_estimate_by_hand():
    # Σv/Σw = 6/6 = 1; residuals v − w = [−1, 0, 1]: std 1 → stderr = 1/(√3 · mean w = 2)
    est = ratio_estimate(np.array([0.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    assert est.mean == pytest.approx(1.0) and est.stderr == pytest.approx(1 / (2 * math.sqrt(3)))


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
    rkl = conditional_reverse_kl(np.log(p_m[x_m]), np.log(p_d[x_m]))
    tvd = total_variation(np.log(p_m[x_m]), np.log(p_d[x_m]))
    assert abs(fkl.mean - np.sum(p_d * np.log(p_d / p_m))) < 5 * fkl.stderr
    # no leakage (q(A) = 1): the conditional KL is the reverse KL itself
    assert abs(rkl.cond.mean - np.sum(p_m * np.log(p_m / p_d))) < 5 * rkl.cond.stderr and rkl.impossible.mean == 0.0
    assert abs(tvd.mean - 0.5 * np.abs(p_d - p_m).sum()) < 5 * tvd.stderr


def test_perplexity_and_per_token():
    assert perplexity(4 * math.log(2), 2) == pytest.approx(4.0)  # exp(2 ln 2)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    assert per_token(Estimate(3.0, 1.5, 10), 3.0) == Estimate(1.0, 0.5, 10)


# --- length ---------------------------------------------------------------------------------


def test_length_histogram_tvd_and_noise():
    assert length_histogram([1, 1, 3], 4).tolist() == [0, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="lengths must lie"):
        length_histogram([5], 4)
    # [2/3, 0, 1/3] vs [0, 1/2, 1/2]: ½(2/3 + 1/2 + 1/6) = 2/3
    assert tvd_of_counts(np.array([2, 0, 1]), np.array([0, 1, 1])) == pytest.approx(2 / 3)
    data = np.random.default_rng(0).integers(5, 30, 2000)
    small, small_q95 = tvd_noise(data, 100, 2000, seed=0)
    big, _ = tvd_noise(data, 1000, 2000, seed=0)
    assert 0 < big < small < small_q95 < 1  # fewer samples → larger chance TVD
    assert tvd_noise(data, 100, 2000, seed=0) == (small, small_q95)  # seeded


def test_length_report_same_distribution_is_within_noise():
    rng = np.random.default_rng(1)
    data, same, short = rng.integers(5, 30, 2000), rng.integers(5, 30, 400), rng.integers(5, 15, 400)
    rep = length_report(same, data, max_len=64)
    assert rep["tvd"] < rep["tvd_noise_q95"] and rep["hist"]["length"][0] == 1
    assert sum(rep["hist"]["samples"]) == 400 and sum(rep["hist"]["data"]) == 2000
    assert length_report(short, data, max_len=64)["tvd"] > 3 * rep["tvd_noise_q95"]


def test_impossible_rate_standardised_to_data_lengths():
    # data: half length 2, half length 10 (two bins); model: 90 short samples, 10% impossible,
    # 10 long ones, 50% impossible. Raw rate 14/100; at the data's lengths ½·0.1 + ½·0.5 = 0.3
    data = [2] * 50 + [10] * 50
    lens = [2] * 90 + [10] * 10
    bad = [True] * 9 + [False] * 81 + [True] * 5 + [False] * 5
    out = impossible_at_data_lengths(lens, bad, data, n_bins=2)
    assert out["impossible_frac_at_data_length"] == pytest.approx(0.3)
    se = math.sqrt(0.25 * 0.1 * 0.9 / 90 + 0.25 * 0.5 * 0.5 / 10)
    assert out["impossible_frac_at_data_length_se"] == pytest.approx(se)
    assert out["impossible_frac_at_data_length_coverage"] == 1.0
    # no model sample in the long bin: only the short bin's data mass is covered
    part = impossible_at_data_lengths([2] * 10, [True] + [False] * 9, data, n_bins=2)
    assert part["impossible_frac_at_data_length"] == pytest.approx(0.1)
    assert part["impossible_frac_at_data_length_coverage"] == 0.5


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
