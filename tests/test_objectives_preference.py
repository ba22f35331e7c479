"""Numeric tests of the preference losses (DPO, EXO, IPO, SimPO, KTO, BOND): hand-computed values, limit cases,
TRL parity, and BOND's best-of-N target against enumeration."""

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
from beyondlm.objectives.preference import best_of_n_log_probs, bond_loss, kto_loss
from beyondlm.objectives.preference import grpo_advantages, grpo_loss


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


# ---- GRPO and Dr. GRPO (online, token-level) ------------------------------------------------------
LN2 = math.log(2.0)


def _grpo_group():
    """One prompt, K = 3 samples, T = 2: sample 0 has two tokens, samples 1 and 2 one each (the
    second position is padding). Rewards [0, 1, 2]: mean 1, unbiased std 1, Â = [−1, 0, 1]/(1 + 1e-4).
    d = log π_ref − log π_θ per token: [0, ln 2], [−ln 2], [0] → k3 = e^d − d − 1 = 0, 1 − ln 2, ln 2 − ½, 0."""
    policy = _t(-1.0, -2.0, -0.5, 0.0, -1.5, 0.0).view(1, 3, 2).requires_grad_()
    mask = torch.tensor([[[1, 1], [1, 0], [1, 0]]], dtype=torch.bool)
    d = _t(0.0, LN2, -LN2, 0.0, 0.0, 0.0).view(1, 3, 2)
    return policy, policy.detach() + d, mask, _t(0.0, 1.0, 2.0).view(1, 3)


def test_grpo_hand_value_and_gradient():
    policy, ref, mask, r = _grpo_group()
    a, beta = 1 / (1 + 1e-4), 0.5
    torch.testing.assert_close(grpo_advantages(r), _t(-a, 0.0, a).view(1, 3))
    loss = grpo_loss(policy, policy.detach(), ref, mask, r, max_tokens=4, beta=beta, clip=0.2, unbiased=0.0)
    # ρ = 1: J = 1/3 [(Â_0 − β·0 + Â_0 − β(1 − ln 2))/2 + (Â_1 − β(ln 2 − ½)) + Â_2] = −β ln 2 / 6 (Σ Â = 0)
    torch.testing.assert_close(loss, _t(beta * LN2 / 6))
    (grad,) = torch.autograd.grad(loss.sum(), policy)
    # ∂loss/∂log π_{i,t} = −[Â_i + β(e^d − 1)] / (K |o_i|)   (∂k3/∂log π = 1 − e^d); 0 on padding
    torch.testing.assert_close(grad, _t(a / 6, (a - beta) / 6, beta / 6, 0.0, -a / 3, 0.0).view(1, 3, 2))


def test_dr_grpo_hand_value_and_gradient():
    """The same group under Dr. GRPO (max_tokens = 4): Â = r − mean r = [−1, 0, 1], every sample's
    token sum divided by 4: J = [2Â_0 − β(1 − ln 2) + Â_1 − β(ln 2 − ½) + Â_2]/(3·4) = −(1 + β/2)/12."""
    policy, ref, mask, r = _grpo_group()
    beta = 0.5
    loss = grpo_loss(policy, policy.detach(), ref, mask, r, max_tokens=4, beta=beta, clip=0.2, unbiased=1.0)
    torch.testing.assert_close(loss, _t((1 + beta / 2) / 12))
    (grad,) = torch.autograd.grad(loss.sum(), policy)  # −[Â_i + β(e^d − 1)] / (K · max_tokens)
    torch.testing.assert_close(grad, _t(1.0, 1 - beta, beta / 2, 0.0, -1.0, 0.0).view(1, 3, 2) / 12)
    with pytest.raises(ValueError, match="max_tokens=1"):  # a sample longer than the constant normaliser
        grpo_loss(policy, policy.detach(), ref, mask, r, max_tokens=1, beta=beta, clip=0.2, unbiased=1.0)


def test_grpo_length_bias_and_dr_grpo_constant_normaliser():
    """One prompt, K = 2: the better sample (r = 1) in 1 token, the worse (r = 0) in 4. GRPO divides
    each sample by its own length, so the short sample's token moves 4× as much as each token of the
    long one (the long answer's penalty is diluted by its length). Dr. GRPO divides both by
    max_tokens: one weight per token, and per token Dr/GRPO = |o_i| (std + 1e-4) / max_tokens."""
    policy = torch.full((1, 2, 4), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    r, max_tokens = _t(1.0, 0.0).view(1, 2), 8
    s = math.sqrt(0.5) + 1e-4  # unbiased std of [1, 0], plus TRL's 1e-4
    a = 0.5 / s  # GRPO's |Â|; Dr. GRPO's is 0.5
    out = {u: grpo_loss(policy, policy.detach(), policy.detach(), mask, r, max_tokens=max_tokens, beta=0.0,
                        clip=0.2, unbiased=u) for u in (0.0, 1.0)}
    grpo, dr = (torch.autograd.grad(out[u].sum(), policy)[0] for u in (0.0, 1.0))
    torch.testing.assert_close(grpo, _t(-a / 2, 0, 0, 0, a / 8, a / 8, a / 8, a / 8).view(1, 2, 4))
    torch.testing.assert_close(dr, _t(-1, 0, 0, 0, 1, 1, 1, 1).view(1, 2, 4) * 0.5 / (2 * max_tokens))
    lengths = mask.sum(-1, keepdim=True).double()  # (1, 2, 1)
    torch.testing.assert_close(dr[mask], (grpo * lengths * s / max_tokens)[mask])
    # values at ρ = 1, β = 0: GRPO −mean_i Â_i = 0; Dr. GRPO −Σ_i Â_i |o_i| / (K max_tokens) = −(0.5 − 2)/16
    torch.testing.assert_close(out[0.0], _t(0.0))
    torch.testing.assert_close(out[1.0], _t(1.5 / 16))


def test_grpo_clips_the_ratio_where_the_advantage_says():
    """Old ≠ policy, β = 0, K = 2 (Â = ±a): ρ = [1.5, 0.5] for both samples. Â > 0: ρ = 1.5 is
    clipped to 1.2 (no gradient), ρ = 0.5 is not (min picks 0.5a). Â < 0: ρ = 1.5 is not clipped
    (min picks −1.5a), ρ = 0.5 is (−0.8a, no gradient). J = [(1.2a + 0.5a)/2 + (−1.5a − 0.8a)/2]/2."""
    old = torch.full((1, 2, 2), -1.0, dtype=torch.float64)
    policy = (old + torch.log(_t(1.5, 0.5, 1.5, 0.5)).view(1, 2, 2)).requires_grad_()
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    loss = grpo_loss(policy, old, policy.detach(), torch.ones(1, 2, 2, dtype=torch.bool), _t(1.0, 0.0).view(1, 2),
                     max_tokens=2, beta=0.0, clip=0.2, unbiased=0.0)
    torch.testing.assert_close(loss, _t(0.15 * a))
    (grad,) = torch.autograd.grad(loss.sum(), policy)  # unclipped tokens: −ρ Â / (K |o_i|)
    torch.testing.assert_close(grad, _t(0.0, -0.5 * a / 4, 1.5 * a / 4, 0.0).view(1, 2, 2))


def test_grpo_without_kl_at_ratio_one_is_the_length_normalised_policy_gradient():
    """β = 0, π_old = π_θ: ∇loss = ∇[−mean_i Â_i · mean_t log π_θ(o_{i,t})] (the clip is inert)."""
    g = torch.Generator().manual_seed(3)
    policy = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64) - 2.0).requires_grad_()
    mask = torch.arange(6) < torch.randint(1, 7, (3, 4, 1), generator=g)  # (3, 4, 6), ≥ 1 token each
    r = torch.randn(3, 4, generator=g, dtype=torch.float64)
    loss = grpo_loss(policy, policy.detach(), torch.randn(3, 4, 6, generator=g, dtype=torch.float64), mask, r,
                     max_tokens=6, beta=0.0, clip=0.2, unbiased=0.0)
    mean_logp = (policy * mask).sum(-1) / mask.sum(-1)  # (3, 4)
    reinforce = -(grpo_advantages(r) * mean_logp).mean(-1)
    for got, want in zip(torch.autograd.grad(loss.sum(), policy), torch.autograd.grad(reinforce.sum(), policy)):
        torch.testing.assert_close(got, want)


def trl_grpo(per_token_logps, old_per_token_logps, ref_per_token_logps, mask, rewards, *, beta, epsilon,
             loss_type, max_completion_length, scale_rewards):
    """TRL 1.16's GRPOTrainer on (B·K, T) rows, K = num_generations consecutive rows per prompt: the
    advantages of trl/trainer/grpo_trainer.py lines 2764-2787 (one reward function; nanstd is the
    Bessel-corrected std) and the loss of lines 3085-3164 (importance_sampling_level="token", no
    vLLM, no entropy or off-policy masks), copied with only the unused branches dropped."""
    num_generations = rewards.shape[-1]
    rewards = rewards.reshape(-1)
    mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations, dim=0)
    std_rewards = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages = advantages.unsqueeze(1)
    per_token_logps, old_per_token_logps, ref_per_token_logps, mask = (
        x.reshape(-1, x.shape[-1]) for x in (per_token_logps, old_per_token_logps, ref_per_token_logps, mask))
    mask = mask.double()
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)  # dr_grpo


def test_grpo_rows_share_the_function_and_the_paper_defaults():
    grpo, dr = PREFERENCE_LOSSES["grpo"], PREFERENCE_LOSSES["dr_grpo"]
    assert grpo.fn is dr.fn is grpo_loss and grpo.kind == dr.kind == "online" and grpo.tokens and dr.tokens
    assert resolve_preference_loss("grpo", {})[1] == {"K": 4, "beta": 0.04, "clip": 0.2, "unbiased": 0.0}
    assert resolve_preference_loss("dr_grpo", {"K": 2})[1] == {"K": 2, "beta": 0.04, "clip": 0.2, "unbiased": 1.0}


@pytest.mark.parametrize("unbiased, loss_type, scale", [(0.0, "grpo", "group"), (1.0, "dr_grpo", "none")])
def test_grpo_matches_trl(unbiased, loss_type, scale):
    g = torch.Generator().manual_seed(4)
    shape = (3, 4, 7)
    policy, old, ref = (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3 - 2.0 for _ in range(3))
    mask = torch.arange(7) < torch.randint(1, 8, (3, 4, 1), generator=g)
    policy, old, ref = (torch.where(mask, x, 0.0) for x in (policy, old, ref))  # TRL's padding values don't matter
    r = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ours = grpo_loss(policy, old, ref, mask, r, max_tokens=7, beta=0.04, clip=0.2, unbiased=unbiased).mean()
    theirs = trl_grpo(policy, old, ref, mask, r, beta=0.04, epsilon=0.2, loss_type=loss_type,
                      max_completion_length=7, scale_rewards=scale)
    torch.testing.assert_close(ours, theirs)


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

        def group(k: int):  # the inputs of k samples per prompt: (B, k) sums, or (B, k, T) token log-probs
            if not row.tokens:
                return tuple(torch.randn(4, k, generator=g, dtype=torch.float64) for _ in range(3))
            logps = [torch.randn(4, k, 5, generator=g, dtype=torch.float64) - 2.0 for _ in range(3)]
            mask = torch.arange(5) < torch.randint(1, 6, (4, k, 1), generator=g)  # ≥ 1 token per sample
            return (*logps, mask, torch.randn(4, k, generator=g, dtype=torch.float64))

        extra = {"max_tokens": 5} if row.tokens else {}
        loss = row.fn(*group(K), **extra, **params)
        with pytest.raises(ValueError, match=f"K={K}"):
            row.fn(*group(2), **extra, **params)
    elif row.kind == "unpaired":  # examples labelled desirable or not, with mismatched (x, y') pairs
        loss = row.fn(pc, rc, torch.tensor([True, False, True, False]), pr, rr, **params)
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
        ("grpo", {"clip": 1.0}, "'clip'=1.0 is outside"),
        ("dr_grpo", {"unbiased": 0.5}, "'unbiased'=0.5 is outside"),
        ("kto", {"lambda_u": 0.0}, "'lambda_u'=0.0 is outside"),
        ("bond", {"N": 2.5}, "'N'=2.5 is outside"),
        ("bond", {"jeffreys": 1.5}, "'jeffreys'=1.5 is outside"),
    ],
)
def test_resolve_errors_name_the_key(name, hp, match):
    with pytest.raises(ValueError, match=match):
        resolve_preference_loss(name, hp)


# ----------------------------------------------------------------------------- KTO
def test_kto_hand_value():
    """β = 0.5, λ_D = 2, λ_U = 1; r = [1, −2] (desirable, undesirable); mismatched log-ratios
    [0.4, 0.2] → z_0 = 0.3. ℓ_D = 2 − 2σ(0.5·0.7), ℓ_U = 1 − σ(0.5·2.3)."""
    loss = kto_loss(_t(-3.0, -6.0), _t(-4.0, -4.0), torch.tensor([True, False]), _t(-1.6, -2.8), _t(-2.0, -3.0),
                    beta=0.5, lambda_d=2.0, lambda_u=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(loss, _t(2 - 2 * sig(0.35), 1 - sig(1.15)))


def test_kto_reference_point_is_clamped_detached_and_halves_at_the_reference():
    policy = _t(-3.0, -5.0, -2.0).requires_grad_()
    ref = policy.detach().clone()
    good = torch.tensor([True, False, True])
    kl_policy = _t(-9.0, -9.0).requires_grad_()  # mean log-ratio −1 < 0: z_0 clamps to 0
    loss = kto_loss(policy, ref, good, kl_policy, _t(-8.0, -8.0), beta=0.1, lambda_d=1.0, lambda_u=3.0)
    torch.testing.assert_close(loss, _t(0.5, 1.5, 0.5))  # λ_y − λ_y σ(0)
    loss.sum().backward()
    assert kl_policy.grad is None  # z_0 is a constant of the gradient
    # d/dr [λ − λσ(±βr)] at r = 0: ∓λβ/4
    torch.testing.assert_close(policy.grad, _t(-0.025, 0.075, -0.025))


def test_kto_positive_reference_point_shifts_the_margin():
    loss = kto_loss(_t(0.0), _t(0.0), torch.tensor([True]), _t(2.0), _t(0.0), beta=1.0, lambda_d=1.0, lambda_u=1.0)
    torch.testing.assert_close(loss, _t(1 - 1 / (1 + math.exp(2.0))))  # σ(0 − z_0), z_0 = 2


# ----------------------------------------------------------------------------- BOND
def _brute_force_best_of_n(p: list[float], r: list[float], N: int) -> list[float]:
    """π_BoN by enumerating every N-tuple of draws; ties among the maxima split uniformly."""
    import itertools

    out = [0.0] * len(p)
    for draws in itertools.product(range(len(p)), repeat=N):
        prob = math.prod(p[i] for i in draws)
        best = max(r[i] for i in draws)
        winners = [i for i in draws if r[i] == best]  # each draw of the top level equally likely
        for i in winners:
            out[i] += prob / len(winners)
    return out


@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_best_of_n_equals_enumeration_on_a_toy_policy(N):
    """Five outputs, two sharing a reward level (ties): the analytic π_BoN equals the enumeration."""
    p = [0.1, 0.25, 0.3, 0.15, 0.2]
    r = [0.0, 1.0, 1.0, 2.0, -1.0]
    got = best_of_n_log_probs(torch.tensor(p).log(), torch.tensor(r), N).exp()
    torch.testing.assert_close(got, torch.tensor(_brute_force_best_of_n(p, r, N), dtype=torch.float64))
    assert got.sum().item() == pytest.approx(1.0)
    if N == 1:
        torch.testing.assert_close(got, torch.tensor(p, dtype=torch.float64))


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n_for_distinct_rewards():
    """With many outputs at distinct levels, KL(π_BoN ‖ π) → log N − (N−1)/N (BOND's bound)."""
    S, N = 4000, 4
    p = torch.full((S,), 1.0 / S, dtype=torch.float64)
    log_bon = best_of_n_log_probs(p.log(), torch.randn(S, dtype=torch.float64), N)
    kl = (log_bon.exp() * (log_bon - p.log())).sum().item()
    assert kl == pytest.approx(math.log(N) - (N - 1) / N, abs=2e-3)


def test_bond_limits_are_the_group_cross_entropy_and_exo_rw():
    """Over a group, the target t = best-of-N of the uniform sample distribution. β_J = 0: forward
    KL(t ‖ p_θ) = DPO-rw with p_r = t (β_π = β_r = 1) minus H(t); β_J = 1: EXO-rw's KL(p_θ ‖ t)."""
    g = torch.Generator().manual_seed(3)
    policy, ref = (torch.randn(5, 4, generator=g, dtype=torch.float64) - 10 for _ in range(2))
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64)
    log_t = best_of_n_log_probs(torch.full((5, 4), -math.log(4), dtype=torch.float64), rewards, 4)
    entropy = -(log_t.exp() * log_t).sum(-1)
    torch.testing.assert_close(bond_loss(policy, ref, rewards, N=4, jeffreys=0.0),
                               dpo_rw_loss(policy, ref, log_t, beta_pi=1.0, beta_r=1.0) - entropy)
    torch.testing.assert_close(bond_loss(policy, ref, rewards, N=4, jeffreys=1.0),
                               exo_rw_loss(policy, ref, log_t, beta_pi=1.0, beta_r=1.0))
    mixed = bond_loss(policy, ref, rewards, N=4, jeffreys=0.25)
    torch.testing.assert_close(mixed, 0.75 * bond_loss(policy, ref, rewards, N=4, jeffreys=0.0)
                               + 0.25 * bond_loss(policy, ref, rewards, N=4, jeffreys=1.0))


def test_bond_is_zero_at_the_best_of_n_policy_and_n1_keeps_the_reference():
    """Δ = log t + const makes p_θ = t: loss 0, gradient 0. N = 1: the target is the reference."""
    rewards = _t(0.3, -1.0, 2.0).unsqueeze(0)
    ref = _t(-5.0, -6.0, -7.0).unsqueeze(0)
    log_t = best_of_n_log_probs(torch.full((1, 3), -math.log(3), dtype=torch.float64), rewards, 3)
    policy = (ref + log_t + 1.7).requires_grad_()
    loss = bond_loss(policy, ref, rewards, N=3, jeffreys=0.5)
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(policy.grad, torch.zeros_like(policy))
    assert bond_loss(ref + 0.4, ref, rewards, N=1, jeffreys=0.5).item() == pytest.approx(0.0, abs=1e-12)
