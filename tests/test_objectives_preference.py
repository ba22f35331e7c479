"""Numeric tests of the DPO/EXO/IPO/SimPO preference losses: hand-computed values, limit cases, TRL parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from beyondlm.objectives.preference import (
    PREFERENCE_LOSSES,
    dpo_pref_loss,
    dpo_rw_loss,
    exo_pref_loss,
    exo_rw_loss,
    ipo_loss,
    pair_margin,
    preference_metrics,
    resolve_preference_loss,
    simpo_loss,
)


def _t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _random_pair(b: int = 16, seed: int = 0, scale: float = 5.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, generator=g, dtype=torch.float64) * scale - 20.0) for _ in range(4)]


def trl_exo_pair(chosen_logratios, rejected_logratios, beta, label_smoothing):
    """TRL 1.16's `exo_pair`, copied verbatim from trl/trainer/dpo_trainer.py lines 1406-1417
    (DPOTrainer._compute_loss; f_divergence_type="reverse_kl" so delta_score is the log-ratio margin).
    Not a standalone function there, hence the copy."""
    delta_score = chosen_logratios - rejected_logratios
    device = delta_score.device
    epsilon = torch.tensor(label_smoothing, device=device)
    qw = torch.sigmoid(beta * delta_score)
    log_qw = F.logsigmoid(beta * delta_score)
    log_pw = torch.log1p(-epsilon)
    ql = torch.sigmoid(-beta * delta_score)
    log_ql = F.logsigmoid(-beta * delta_score)
    log_pl = torch.log(epsilon)
    return qw * (log_qw - log_pw) + ql * (log_ql - log_pl)


def trl_ipo(chosen_logratios, rejected_logratios, chosen_len, rejected_len, beta):
    """TRL 1.16's `ipo`, trl/trainer/dpo_trainer.py lines 1393-1404 (DPOTrainer._compute_loss,
    f_divergence_type="reverse_kl"; the mask sums are the completion lengths): per-token averages."""
    chosen_avg_score = chosen_logratios / chosen_len.clamp(min=1.0)
    rejected_avg_score = rejected_logratios / rejected_len.clamp(min=1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    return (ipo_delta - 1 / (2 * beta)) ** 2


def trl_simpo(chosen_logps, rejected_logps, chosen_len, rejected_len, beta, simpo_gamma):
    """TRL 1.16's `simpo`, trl/experimental/cpo/cpo_trainer.py lines 715-722 (CPOTrainer.cpo_loss,
    alpha = 0, label_smoothing = 0), on get_batch_logps(average_log_prob=True) = sum / |y|."""
    logits = chosen_logps / chosen_len - rejected_logps / rejected_len
    logits = logits - simpo_gamma / beta
    return -F.logsigmoid(beta * logits)


# ---- hand-computed values ------------------------------------------------------------------------
# Pair: Δ_w = −1 − (−2) = 1, Δ_l = −3 − (−2) = −1, margin 2, β = 0.5 → z = 1.
PAIR = (_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0))


def test_dpo_pref_hand_value():
    # −log σ(1) = log(1 + e^−1)
    assert dpo_pref_loss(*PAIR, beta=0.5).item() == pytest.approx(0.31326168751822286, rel=1e-12)


def test_exo_pref_hand_value():
    # σ(1)[log σ(1) − log 0.9] + σ(−1)[log σ(−1) − log 0.1]
    got = exo_pref_loss(*PAIR, beta=0.5, epsilon=0.1).item()
    assert got == pytest.approx(0.11408210766749788, rel=1e-12)


# Group K = 3: Δ = [1, 0, −1], β_π = 1; rewards [2, 0, 0], β_r = 1.
# p_θ = softmax([1, 0, −1]) = [0.66524, 0.24473, 0.09003]; p_r = softmax([2, 0, 0]) = [0.78699, 0.10651, 0.10651]
GROUP = (_t(-1.0, -2.0, -3.0)[None], _t(-2.0, -2.0, -2.0)[None], _t(2.0, 0.0, 0.0)[None])


def test_exo_rw_hand_value():
    # Σ p_θ (log p_θ − log p_r)
    got = exo_rw_loss(*GROUP, beta_pi=1.0, beta_r=1.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(0.07666727283230187, rel=1e-12)


def test_dpo_rw_hand_value():
    # −Σ p_r log p_θ
    assert dpo_rw_loss(*GROUP, beta_pi=1.0, beta_r=1.0).item() == pytest.approx(0.7271269012019825, rel=1e-12)


# IPO on the same pair: margin Δ_w − Δ_l = 2. τ = 1 → target 1/(2τ) = 0.5 → (2 − 0.5)² = 2.25.
# Per token with |y_w| = 2, |y_l| = 4: Δ_w/2 − Δ_l/4 = 0.5 + 0.25 = 0.75 → (0.75 − 0.5)² = 0.0625.
LENS = (torch.tensor([2]), torch.tensor([4]))  # |y_w|, |y_l| in tokens (EOS included)


def test_ipo_hand_value():
    got = ipo_loss(*PAIR, chosen_tokens=LENS[0], rejected_tokens=LENS[1], tau=1.0)
    assert got.item() == pytest.approx(2.25, rel=1e-12)
    got = ipo_loss(*PAIR, chosen_tokens=LENS[0], rejected_tokens=LENS[1], tau=1.0, length_normalize=1.0)
    assert got.item() == pytest.approx(0.0625, rel=1e-12)


# SimPO (reference ignored): log π_θ(y_w) = −1 over 2 tokens, log π_θ(y_l) = −3 over 4 tokens.
# Means ℓ̄_w = −0.5, ℓ̄_l = −0.75; β = 2, γ = 1: z = 2·0.25 − 1 = −0.5 → −log σ(−0.5) = log(1 + e^0.5).
# Sums instead (length_normalize 0): z = 2·(−1 + 3) − 1 = 3 → log(1 + e^−3).
def test_simpo_hand_value():
    kw = dict(chosen_tokens=LENS[0], rejected_tokens=LENS[1], beta=2.0, gamma=1.0)
    assert simpo_loss(*PAIR, **kw).item() == pytest.approx(0.9740769841801067, rel=1e-12)
    assert simpo_loss(*PAIR, **kw, length_normalize=0.0).item() == pytest.approx(0.04858735157374206, rel=1e-12)


# ---- limit cases ---------------------------------------------------------------------------------
def test_dpo_policy_equals_reference_gives_log2():
    pc, pr, _, _ = _random_pair()
    loss = dpo_pref_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert loss.shape == pc.shape
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2.0)))


@pytest.mark.parametrize("epsilon", [1e-3, 0.1, 4.5e-5])
def test_exo_pref_matches_trl_exo_pair(epsilon):
    pc, pr, rc, rr = _random_pair(b=64, seed=1, scale=20.0)
    ours = exo_pref_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=0.1, epsilon=epsilon)
    theirs = trl_exo_pair((pc - rc).float(), (pr - rr).float(), 0.1, epsilon)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_exo_pref_is_kl_so_zero_at_target():
    # KL(p_θ ‖ (1−ε, ε)) = 0 exactly where σ(z) = 1 − ε, i.e. z = log((1−ε)/ε); positive elsewhere.
    eps, beta = 1e-3, 0.5
    z = math.log((1 - eps) / eps)
    at = exo_pref_loss(_t(z / beta), _t(0.0), _t(0.0), _t(0.0), beta=beta, epsilon=eps)
    assert at.item() == pytest.approx(0.0, abs=1e-12)
    off = exo_pref_loss(_t(0.0, 1.0, 30.0), _t(0.0), _t(0.0), _t(0.0), beta=beta, epsilon=eps)
    assert (off > 0).all()


def test_exo_rw_k2_equals_exo_pref_with_soft_epsilon():
    # With K = 2 the reward target is (1 − ε, ε) with ε = σ(−(r_w − r_l)/β_r): an exact identity.
    pc, pr, rc, rr = _random_pair(seed=2)
    r_gap, beta_r = 0.3, 0.2
    rewards = torch.stack([torch.full_like(pc, r_gap), torch.zeros_like(pc)], dim=1)  # (B, 2)
    rw = exo_rw_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta_pi=0.4, beta_r=beta_r)
    eps = 1.0 / (1.0 + math.exp(r_gap / beta_r))
    torch.testing.assert_close(rw, exo_pref_loss(pc, pr, rc, rr, beta=0.4, epsilon=eps))


def test_exo_rw_hard_rewards_approach_exo_pref_small_epsilon():
    # β_r → 0 with r_w > r_l vs ε → 0: at β_r = 0.01, r_w − r_l = 0.1 the target is the authors'
    # hard-coded log targets [0, −10] (ε = σ(−10)); compare against ε = 1e-5 and ε = 4.5e-5.
    pc, pr, rc, rr = _random_pair(seed=3, scale=2.0)
    rewards = torch.stack([torch.full_like(pc, 0.1), torch.zeros_like(pc)], dim=1)
    rw = exo_rw_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta_pi=1.0, beta_r=0.01)
    torch.testing.assert_close(rw, exo_pref_loss(pc, pr, rc, rr, beta=1.0, epsilon=4.5e-5), rtol=1e-3, atol=1e-3)
    # Smaller β_r: the gap to ε → 0 shrinks like σ(−z)·log(ε'/ε) with ε' = σ(−gap/β_r).
    rewards_hard = rewards * 10.0  # ε' = σ(−100)
    rw_hard = exo_rw_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards_hard, beta_pi=1.0, beta_r=0.01)
    torch.testing.assert_close(rw_hard, exo_pref_loss(pc, pr, rc, rr, beta=1.0, epsilon=math.exp(-100.0)))


def test_dpo_rw_one_hot_equals_dpo_pref():
    pc, pr, rc, rr = _random_pair(seed=4)
    rewards = torch.stack([torch.full_like(pc, 1e4), torch.zeros_like(pc)], dim=1)  # p_r = (1, 0) exactly
    rw = dpo_rw_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta_pi=0.7, beta_r=0.1)
    torch.testing.assert_close(rw, dpo_pref_loss(pc, pr, rc, rr, beta=0.7))


def _lengths(b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 30, (b,), generator=g) for _ in range(2)]  # |y_w|, |y_l|


@pytest.mark.parametrize("length_normalize", [0.0, 1.0])
def test_ipo_policy_equals_reference_gives_inverse_4_tau_squared(length_normalize):
    # Δ_w = Δ_l = 0 → (0 − 1/(2τ))² = 1/(4τ²): τ = 0.1 gives 25, whatever the lengths.
    pc, pr, _, _ = _random_pair()
    nw, nl = _lengths()
    loss = ipo_loss(pc, pr, pc.clone(), pr.clone(), chosen_tokens=nw, rejected_tokens=nl, tau=0.1,
                    length_normalize=length_normalize)
    torch.testing.assert_close(loss, torch.full_like(loss, 25.0))


def test_ipo_is_zero_with_zero_gradient_at_its_target_margin():
    tau = 0.25  # target 1/(2τ) = 2 on the sequence log-ratio margin
    pc = _t(2.0, 2.5).requires_grad_(True)
    loss = ipo_loss(pc, _t(0.0, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), chosen_tokens=torch.tensor([3, 3]),
                    rejected_tokens=torch.tensor([5, 5]), tau=tau)
    torch.testing.assert_close(loss, _t(0.0, 0.25))
    (g,) = torch.autograd.grad(loss.sum(), pc)
    torch.testing.assert_close(g, _t(0.0, 1.0))  # d/dΔ_w (m − 2)² = 2(m − 2)


def test_ipo_matches_trl_per_token_convention():
    pc, pr, rc, rr = _random_pair(b=64, seed=8, scale=20.0)
    nw, nl = _lengths(64, seed=8)
    ours = ipo_loss(pc, pr, rc, rr, chosen_tokens=nw, rejected_tokens=nl, tau=0.1, length_normalize=1.0)
    torch.testing.assert_close(ours, trl_ipo(pc - rc, pr - rr, nw.double(), nl.double(), 0.1))
    # With all lengths 1 the two conventions agree.
    ones = torch.ones_like(nw)
    seq = ipo_loss(pc, pr, rc, rr, chosen_tokens=ones, rejected_tokens=ones, tau=0.1)
    torch.testing.assert_close(seq, trl_ipo(pc - rc, pr - rr, ones.double(), ones.double(), 0.1))


def test_simpo_gamma_zero_without_normalisation_is_dpo_without_reference():
    # −log σ(β(log π_θ(y_w) − log π_θ(y_l))) = DPO at β with reference log-probs 0.
    pc, pr, rc, rr = _random_pair(seed=9)
    nw, nl = _lengths(seed=9)
    simpo = simpo_loss(pc, pr, rc, rr, chosen_tokens=nw, rejected_tokens=nl, beta=0.7, gamma=0.0,
                       length_normalize=0.0)
    torch.testing.assert_close(simpo, dpo_pref_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), beta=0.7))


def test_simpo_is_reference_free_and_log2_at_equal_means():
    pc, pr, rc, rr = _random_pair(seed=10)
    nw, nl = _lengths(seed=10)
    kw = dict(chosen_tokens=nw, rejected_tokens=nl, beta=2.0, gamma=1.0)
    torch.testing.assert_close(simpo_loss(pc, pr, rc, rr, **kw), simpo_loss(pc, pr, rc * 3 - 1, None, **kw))
    # Equal mean token log-probs (−1.5 per token over 2 and over 6 tokens) and γ = 0: log 2.
    even = simpo_loss(_t(-3.0), _t(-9.0), chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([6]),
                      beta=2.0, gamma=0.0)
    assert even.item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_simpo_matches_trl_cpo_simpo():
    pc, pr, _, _ = _random_pair(b=64, seed=11, scale=20.0)
    nw, nl = _lengths(64, seed=11)
    ours = simpo_loss(pc, pr, chosen_tokens=nw, rejected_tokens=nl, beta=2.0, gamma=1.0)
    torch.testing.assert_close(ours, trl_simpo(pc, pr, nw.double(), nl.double(), 2.0, 1.0))


# ---- gradients, shapes, extremes -----------------------------------------------------------------
def _all_losses(pc, pr, rc, rr):
    pol, ref = torch.stack([pc, pr], 1), torch.stack([rc, rr], 1)  # (B, 2)
    rewards = torch.stack([rc * 0 + 1.0, rc * 0], 1)
    n = torch.arange(1, pc.shape[0] + 1)
    lens = {"chosen_tokens": n, "rejected_tokens": n.flip(0)}
    return {
        "dpo_pref": dpo_pref_loss(pc, pr, rc, rr, beta=0.1),
        "exo_pref": exo_pref_loss(pc, pr, rc, rr, beta=0.1, epsilon=1e-3),
        "exo_rw": exo_rw_loss(pol, ref, rewards, beta_pi=0.1, beta_r=0.1),
        "dpo_rw": dpo_rw_loss(pol, ref, rewards, beta_pi=0.1, beta_r=0.1),
        "ipo": ipo_loss(pc, pr, rc, rr, **lens, tau=0.1),
        "ipo_per_token": ipo_loss(pc, pr, rc, rr, **lens, tau=0.1, length_normalize=1.0),
        "simpo": simpo_loss(pc, pr, rc, rr, **lens, beta=2.0, gamma=1.0),
    }


def test_gradients_reach_policy_only():
    pc, pr, rc, rr = (x.float().requires_grad_(True) for x in _random_pair(b=8, seed=5))
    for name, loss in _all_losses(pc, pr, rc, rr).items():
        assert loss.shape == (8,), name
        g_pc, g_pr, g_rc, g_rr = torch.autograd.grad(loss.sum(), [pc, pr, rc, rr], allow_unused=True)
        assert g_pc is not None and g_pc.abs().sum() > 0, name
        assert g_pr is not None and g_pr.abs().sum() > 0, name
        assert g_rc is None and g_rr is None, name  # reference log-probs are detached targets


def test_rewards_without_grad_are_fine_and_detached():
    pol = torch.randn(3, 4, requires_grad=True)
    rewards = torch.randn(3, 4, requires_grad=True)
    loss = exo_rw_loss(pol, torch.zeros(3, 4), rewards, beta_pi=0.5, beta_r=0.5)
    g_pol, g_r = torch.autograd.grad(loss.sum(), [pol, rewards], allow_unused=True)
    assert g_pol is not None and g_r is None


@pytest.mark.parametrize("big", [1e4, -1e4])
def test_extreme_inputs_are_finite(big):
    n = 6
    pc = torch.tensor([big, -big, 0.0, big, -big, 1.0], requires_grad=True)
    pr = torch.tensor([-big, big, big, big, 0.0, -1.0], requires_grad=True)
    rc = torch.tensor([0.0, big, -big, -big, big, 0.0])
    rr = torch.tensor([big, 0.0, big, -big, -big, 0.0])
    for name, loss in _all_losses(pc, pr, rc * 1.0, rr * 1.0).items():
        assert loss.shape == (n,) and torch.isfinite(loss).all(), (name, loss)
        grads = torch.autograd.grad(loss.sum(), [pc, pr])
        assert all(torch.isfinite(g).all() for g in grads), name
    # group losses with extreme rewards and K = 4 too
    pol = torch.tensor([[big, -big, 0.0, 1.0]], requires_grad=True)
    r = torch.tensor([[-big, big, 0.0, big]])
    for fn in (exo_rw_loss, dpo_rw_loss):
        loss = fn(pol, torch.zeros_like(r), r, beta_pi=1.0, beta_r=0.01)
        assert torch.isfinite(loss).all() and torch.isfinite(torch.autograd.grad(loss.sum(), pol)[0]).all()


def test_half_precision_inputs_are_computed_in_float32():
    pc, pr, rc, rr = (x.to(torch.bfloat16) for x in _random_pair(seed=6, scale=1.0))
    loss = exo_pref_loss(pc, pr, rc, rr, beta=0.1, epsilon=1e-3)
    assert loss.dtype == torch.float32


# ---- metrics and the table -----------------------------------------------------------------------
def test_preference_metrics_trl_keys_and_values():
    pc, pr, rc, rr = _t(-1.0, -5.0), _t(-3.0, -4.0), _t(-2.0, -2.0), _t(-2.0, -2.0)
    m = preference_metrics(pc, pr, rc, rr, beta=0.5)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    # β Δ_w = [0.5, −1.5], β Δ_l = [−0.5, −1.0]
    assert m["rewards/chosen"] == pytest.approx(-0.5)
    assert m["rewards/rejected"] == pytest.approx(-0.75)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.25)
    assert m["logps/chosen"] == pytest.approx(-3.0)
    assert m["logps/rejected"] == pytest.approx(-3.5)


def test_pair_margin_from_chunked_batch():
    logps = _t(-1.0, -5.0, -3.0, -4.0)  # (2B,) = [chosen; rejected]
    ref = _t(-2.0, -2.0, -2.0, -2.0)
    torch.testing.assert_close(pair_margin(*logps.chunk(2), *ref.chunk(2)), _t(2.0, -1.0))


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_table_rows_run_with_defaults(name):
    row, params = resolve_preference_loss(name, {})
    assert row.name == name and row.reference
    pc, pr, rc, rr = _random_pair(b=4, seed=7)
    if row.kind == "pair":
        lengths = {"chosen_tokens": torch.tensor([1, 5, 9, 2]), "rejected_tokens": torch.tensor([3, 3, 1, 7])}
        loss = row.fn(pc, pr, rc, rr, **(lengths if row.lengths else {}), **params)
    elif row.kind == "online":  # groups of the K samples the loop draws itself
        K = int(params["K"])
        g = torch.Generator().manual_seed(0)
        loss = row.fn(*(torch.randn(4, K, generator=g, dtype=torch.float64) for _ in range(3)), **params)
        with pytest.raises(ValueError, match=f"K={K}"):
            row.fn(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.zeros(4, 2), **params)
    else:
        loss = row.fn(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.randn(4, 2, dtype=torch.float64),
                      **params)
    assert loss.shape == (4,) and torch.isfinite(loss).all()


def test_resolve_overrides_defaults():
    row, params = resolve_preference_loss("exo_pref", {"epsilon": 4.5e-5})
    assert row.fn is exo_pref_loss and params == {"beta": 0.1, "epsilon": 4.5e-5}
    # the papers' defaults: IPO τ = 0.1 on sequence log-ratios; SimPO β = 2, γ/β = 0.5, per-token means
    assert resolve_preference_loss("ipo", {})[1] == {"tau": 0.1, "length_normalize": 0.0}
    assert resolve_preference_loss("simpo", {"length_normalize": 0})[1] == {"beta": 2.0, "gamma": 1.0,
                                                                            "length_normalize": 0.0}


@pytest.mark.parametrize(
    "name, hp, match",
    [
        ("no_such_loss", {}, "unknown preference loss 'no_such_loss'"),
        ("ipo", {"tau": 0.0}, "'tau'=0.0 is outside"),
        ("ipo", {"beta": 0.1}, r"unknown hyperparameter\(s\) \['beta'\]"),  # IPO's strength is τ
        ("simpo", {"gamma": -0.5}, "'gamma'=-0.5 is outside"),
        ("simpo", {"length_normalize": 0.5}, "'length_normalize'=0.5 is outside"),
        ("dpo_pref", {"epsilon": 0.1}, r"unknown hyperparameter\(s\) \['epsilon'\]"),
        ("exo_pref", {"epsilon": 0.0}, "'epsilon'=0.0 is outside"),
        ("exo_pref", {"epsilon": 0.5}, "'epsilon'=0.5 is outside"),
        ("exo_rw", {"beta_r": -1.0}, "'beta_r'=-1.0 is outside"),
        ("dpo_rw", {"beta_pi": "big"}, "'beta_pi' must be a finite number"),
        ("dpo_pref", {"beta": float("nan")}, "'beta' must be a finite number"),
    ],
)
def test_resolve_errors_name_the_key(name, hp, match):
    with pytest.raises(ValueError, match=match):
        resolve_preference_loss(name, hp)
