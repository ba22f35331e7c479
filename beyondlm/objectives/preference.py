"""Preference objectives: DPO and EXO, pairwise (-pref) and over groups of K scored samples (-rw),
IPO and the reference-free SimPO on pairs, KTO on unpaired desirable/undesirable examples, BOND
(best-of-N distillation) on groups, and the on-policy RLOO, GRPO and Dr. GRPO (groups they sample
themselves).

Every loss is a pure function of sequence log-probabilities (already summed over response tokens,
prompt masked, EOS included; see `beyondlm.logprobs.sequence_logps`) returning the per-example loss:

    pair:  fn(policy_chosen (B,), policy_rejected (B,), ref_chosen (B,), ref_rejected (B,), *, ...) -> (B,)
    group: fn(policy_logps (B, K), ref_logps (B, K), rewards (B, K), *, ...) -> (B,)
    unpaired: fn(policy (B,), ref (B,), desirable (B,) bool, kl_policy (M,), kl_ref (M,), *, ...) -> (B,)

A pair row with ``lengths=True`` (IPO, SimPO) also takes ``chosen_tokens``, ``rejected_tokens`` (B,):
the completion lengths |y| in tokens, counted as the log-probs count them (response tokens, EOS
included), for the per-token averages ℓ/|y| of its ``length_normalize`` switch.
An online row with ``tokens=True`` (GRPO, Dr. GRPO: per-token ratios and KL) takes token log-probs:
fn(policy (B, K, T), old (B, K, T), ref (B, K, T), mask (B, K, T), rewards (B, K), *, max_tokens, ...) -> (B,).

Δ(y) = log π_θ(y) − log π_ref(y) is the sequence log-ratio. A pair batch coming out of the model as
one (2B,) tensor is `[chosen; rejected]` on dim 0 (`logps.chunk(2)`). Reference log-probs and
rewards are targets: they are DETACHED inside, so gradients reach the policy log-probs only.
Everything is computed in float32 (or the input's wider dtype) through logsigmoid / log_softmax,
so the values stay finite for |Δ| up to ~1e4. Reduce with `.mean()` (or `.sum()` with the
number of pairs/groups as the unit count in the shared training loop). The names live in one
table, `PREFERENCE_LOSSES`; `resolve_preference_loss` validates hyperparameters against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from beyondlm.objectives.table import resolve


def _f(x: Tensor) -> Tensor:
    # float32 at least: logsigmoid of a half-precision margin loses the small-ε target entirely.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def pair_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                ref_rejected: Tensor) -> Tensor:
    """Δ_w − Δ_l = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]: (B,).

    The reference terms are detached (they are fixed targets)."""
    ref = _f(ref_chosen).detach() - _f(ref_rejected).detach()
    return (_f(policy_chosen) - _f(policy_rejected)) - ref


def dpo_pref_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float) -> Tensor:
    """DPO: Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, eq. 7:
        ℓ = −log σ(β (Δ_w − Δ_l)).
    Inputs (B,) sequence log-probs; returns (B,). Policy = reference gives log 2.
    """
    z = beta * pair_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # (B,)
    return -F.logsigmoid(z)


def exo_pref_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float, epsilon: float) -> Tensor:
    """EXO-pref: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
    ICML 2024, EXO-pref (eq. 16 of arXiv 2402.00856, as TRL cites it), K = 2: KL(p_θ ‖ p_ε)
    between p_θ = softmax(β·[Δ_w, Δ_l]) and the target p_ε = (1 − ε, ε). With z = β (Δ_w − Δ_l):
        ℓ = σ(z)[log σ(z) − log(1 − ε)] + σ(−z)[log σ(−z) − log ε].
    Same formula as TRL's `loss_type="exo_pair"` with label_smoothing = ε (their port; default
    1e-3). The authors' own repo hard-codes target log-probs [0, −10], i.e. ε = σ(−10) ≈ 4.5e-5.
    Minimum 0 at z = log((1 − ε)/ε). Inputs (B,); returns (B,).
    """
    z = beta * pair_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # (B,)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)  # log σ(z), log σ(−z), stable for |z| ~ 1e4
    # exp(log σ) underflows to exactly 0 where the other factor is large: 0 · finite, never 0 · inf.
    return log_qw.exp() * (log_qw - math.log1p(-epsilon)) + log_ql.exp() * (log_ql - math.log(epsilon))


def _per_token(logps: Tensor, n_tokens: Tensor, length_normalize: float) -> Tensor:
    """logps / |y| with ``length_normalize`` = 1.0, logps unchanged with 0.0: (B,) → (B,).

    ``n_tokens`` (B,) counts the completion tokens summed in ``logps`` (EOS included); clamped at 1
    so an empty completion (log-prob 0) stays 0 instead of 0/0."""
    x = _f(logps)
    return x / n_tokens.to(device=x.device, dtype=x.dtype).clamp(min=1.0) if length_normalize else x


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor, tau: float, length_normalize: float = 0.0) -> Tensor:
    """IPO: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", AISTATS 2024 (arXiv 2310.12036), eq. 17, the empirical IPO loss per pair:
        ℓ = (Δ_w − Δ_l − 1/(2τ))²,
    a regression of the log-ratio margin onto 1/(2τ) instead of DPO's ever-growing logistic margin.
    τ is the KL-regularisation strength (TRL's ``beta`` plays τ; default 0.1, TRL's).

    Convention. With ``length_normalize`` = 0.0 (our default) Δ is the *sequence* log-ratio, the
    sum over response tokens (EOS included) that DPO and EXO use here: eq. 17 as written, and τ
    scales the same Δ as DPO's β. With 1.0 each Δ is divided by its completion length |y| in
    tokens, Δ_w/|y_w| − Δ_l/|y_l|: TRL's ``DPOTrainer(loss_type="ipo")`` (trl 1.16,
    dpo_trainer.py, which says the IPO authors confirmed their reported results used this
    per-token average). Per-token, the target 1/(2τ) is a margin *per token*, far larger in
    total: choose τ for the convention used.
    Inputs (B,) sequence log-probs and (B,) token counts; returns (B,). Policy = reference gives
    1/(4τ²); the minimum 0 is at margin 1/(2τ). Reference terms detached.
    """
    chosen = _per_token(_f(policy_chosen) - _f(ref_chosen).detach(), chosen_tokens, length_normalize)  # (B,)
    rejected = _per_token(_f(policy_rejected) - _f(ref_rejected).detach(), rejected_tokens, length_normalize)
    return (chosen - rejected - 1.0 / (2.0 * tau)) ** 2


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None = None,
               ref_rejected: Tensor | None = None, *, chosen_tokens: Tensor, rejected_tokens: Tensor,
               beta: float, gamma: float, length_normalize: float = 1.0) -> Tensor:
    """SimPO: Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", NeurIPS 2024 (arXiv 2405.14734), eq. 6:
        ℓ = −log σ(β/|y_w| · log π_θ(y_w|x) − β/|y_l| · log π_θ(y_l|x) − γ).
    Reference-free: ``ref_chosen``/``ref_rejected`` are accepted for the common pair signature and
    ignored. The implicit reward is the mean token log-prob (``length_normalize`` = 1.0, the paper);
    0.0 uses the sequence sums, and then γ = 0 gives DPO's loss with a uniform reference
    (−log σ(β(log π_θ(y_w) − log π_θ(y_l)))). γ is the target reward margin, as in the paper and
    TRL's ``CPOTrainer(loss_type="simpo")`` ``simpo_gamma`` (its logits ℓ̄_w − ℓ̄_l − γ/β, times β);
    the authors' trainer takes γ/β (``gamma_beta_ratio``) instead. Defaults β = 2.0, γ = 1.0
    (γ/β = 0.5, the authors' recommended start and their Llama3-Base setting).
    Inputs (B,) sequence log-probs and (B,) token counts (EOS included); returns (B,).
    """
    chosen = _per_token(policy_chosen, chosen_tokens, length_normalize)  # (B,) ℓ̄_w
    rejected = _per_token(policy_rejected, rejected_tokens, length_normalize)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_policy_logps: Tensor,
             kl_ref_logps: Tensor, *, beta: float, lambda_d: float, lambda_u: float) -> Tensor:
    """KTO: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024
    (arXiv 2402.01306), eq. 8, on unpaired examples each labelled desirable or undesirable:
        r = log π_θ(y|x) − log π_ref(y|x),
        z_0 = max(0, mean_j [log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j)]),  detached,
        v = λ_D σ(β(r − z_0)) if y is desirable,  λ_U σ(β(z_0 − r)) if undesirable,
        ℓ = λ_y − v.
    z_0, the reference point, estimates KL(π_θ ‖ π_ref) from the batch's *mismatched* pairs
    (x_j, y'_j): a completion scored under another example's prompt, as the paper's
    implementation and TRL's ``KTOTrainer`` do; it is a constant of the gradient (detached),
    and clamped at 0 like theirs. Defaults β = 0.1, λ_D = λ_U = 1 (the paper's recommendation
    λ_D n_D / (λ_U n_U) ∈ [1, 4/3] holds for balanced labels).
    Inputs: ``policy_logps``, ``ref_logps``, ``desirable`` (bool) (B,); ``kl_policy_logps``,
    ``kl_ref_logps`` (M,) for the mismatched pairs. Returns (B,). Policy = reference with
    z_0 = 0 gives λ_y / 2 per example. Reference and KL terms detached.
    """
    z0 = (_f(kl_policy_logps).detach() - _f(kl_ref_logps).detach()).mean().clamp(min=0.0)  # ()
    r = _f(policy_logps) - _f(ref_logps).detach()  # (B,)
    good = desirable.to(device=r.device, dtype=torch.bool)
    weight = torch.where(good, torch.full_like(r, lambda_d), torch.full_like(r, lambda_u))
    value = weight * torch.sigmoid(beta * torch.where(good, r - z0, z0 - r))
    return weight - value


def group_log_probs(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta_pi: float,
                    beta_r: float) -> tuple[Tensor, Tensor]:
    """log p_θ = log_softmax_i(β_π Δ_i) and log p_r = log_softmax_i(r_i / β_r) over the group dim.

    Ji et al., ICML 2024 (the EXO distributions over a group). Inputs (B, K); returns two (B, K) tensors; ref and rewards
    detached."""
    delta = _f(policy_logps) - _f(ref_logps).detach()  # (B, K)
    log_p_theta = torch.log_softmax(beta_pi * delta, dim=-1)
    log_p_r = torch.log_softmax(_f(rewards).detach() / beta_r, dim=-1)
    return log_p_theta, log_p_r


def exo_rw_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta_pi: float,
                beta_r: float) -> Tensor:
    """EXO-rw: Ji et al., ICML 2024 (EXO with a reward model): the reverse KL over the K samples of one prompt
        ℓ = KL(p_θ ‖ p_r) = Σ_i p_θ(i) [log p_θ(i) − log p_r(i)],
    p_θ = softmax(β_π Δ), p_r = softmax(r / β_r). Inputs (B, K); returns (B,). With K = 2 this is
    exactly EXO-pref with ε = σ(−(r_w − r_l)/β_r).
    """
    log_p_theta, log_p_r = group_log_probs(policy_logps, ref_logps, rewards, beta_pi=beta_pi, beta_r=beta_r)
    return (log_p_theta.exp() * (log_p_theta - log_p_r)).sum(-1)


def dpo_rw_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta_pi: float,
                beta_r: float) -> Tensor:
    """DPO-rw: the forward cross-entropy over the group (Ji et al., ICML 2024, their "DPO-rw" baseline; DPO's
    Plackett-Luce generalization to soft targets, Rafailov et al. 2023 §5):
        ℓ = −Σ_i p_r(i) log p_θ(i)  (= KL(p_r ‖ p_θ) + H(p_r)),
    p_θ = softmax(β_π Δ), p_r = softmax(r / β_r). Inputs (B, K); returns (B,). One-hot p_r with
    K = 2 gives DPO-pref.
    """
    log_p_theta, log_p_r = group_log_probs(policy_logps, ref_logps, rewards, beta_pi=beta_pi, beta_r=beta_r)
    return -(log_p_r.exp() * log_p_theta).sum(-1)


def best_of_n_log_probs(log_probs: Tensor, rewards: Tensor, N: float) -> Tensor:
    """log π_BoN over a finite support: the distribution of the highest-reward draw among N
    independent draws from π (ties broken uniformly at random). For each point y,
        π_BoN(y) = π(y) · [F(r(y))^N − F⁻(r(y))^N] / [F(r(y)) − F⁻(r(y))],
    F(r) = π(r(Y) ≤ r), F⁻(r) = π(r(Y) < r): the probability that the maximum lands on y's reward
    level, shared among the level's points in proportion to π (the analytic best-of-N distribution
    of Sessa et al., ICLR 2025; for a point alone at its level F − F⁻ = π(y) and this is
    F^N − F⁻^N).
    ``log_probs`` (..., S) are log π over the support (normalised over the last dim), ``rewards``
    (..., S); returns (..., S) in float64 (powers of N of probabilities near 1), detached.
    """
    logp = log_probs.detach().double()
    p = logp.exp()
    r = rewards.detach().double()
    below = (r.unsqueeze(-2) <= r.unsqueeze(-1)).double()  # [..., i, j] = 1[r_j ≤ r_i]
    F = (below * p.unsqueeze(-2)).sum(-1)  # (..., S)
    F_lt = ((r.unsqueeze(-2) < r.unsqueeze(-1)).double() * p.unsqueeze(-2)).sum(-1)
    level = (F - F_lt).clamp(min=torch.finfo(torch.float64).tiny)
    return logp + torch.log(F.pow(N) - F_lt.pow(N)) - torch.log(level)


def bond_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, N: float, jeffreys: float) -> Tensor:
    """BOND: Sessa et al., "BOND: Aligning LLMs with Best-of-N Distillation", ICLR 2025 (arXiv
    2407.14622): distil the best-of-N distribution π_BoN of the reference into the policy with the
    Jeffreys divergence
        ℓ = (1 − β_J)·KL(π_BoN ‖ π_θ) + β_J·KL(π_θ ‖ π_BoN),
    β_J = ``jeffreys`` (0 = forward KL, i.e. SFT on best-of-N samples; 1 = backward KL, the policy-
    gradient form). Offline estimator over one prompt's K reference samples y_1..K ∼ π_ref scored
    by the reward model (the same groups EXO-rw and DPO-rw train on): restricted to the group, the
    reference is uniform (1/K each), the policy is its self-normalised importance weights
    p_θ(i) = softmax_i(Δ_i), Δ_i = log π_θ(y_i) − log π_ref(y_i), and the target is the best-of-N
    distribution of the group, ``best_of_n_log_probs(uniform, r, N)``: F and F⁻ are the empirical
    reward quantiles of the K samples, the paper's Monte Carlo quantile estimate. As K grows the
    target tends to π_BoN(·|x)/π_ref(·|x) on the samples and the minimiser of ℓ to π_BoN itself,
    whose KL to π_ref is at most log N − (N−1)/N. Defaults N = 4 (the default K, and a row of the
    best_of_n stage it imitates), β_J = 0.5.
    Inputs (B, K); returns (B,). Reference and rewards detached.
    """
    delta = _f(policy_logps) - _f(ref_logps).detach()  # (B, K)
    log_p = torch.log_softmax(delta, dim=-1)
    uniform = torch.full_like(delta, -math.log(delta.shape[-1]))
    log_t = best_of_n_log_probs(uniform, rewards, N).to(log_p.dtype)  # (B, K), > −inf everywhere
    forward = (log_t.exp() * (log_t - log_p)).sum(-1)
    backward = (log_p.exp() * (log_p - log_t)).sum(-1)
    return (1.0 - jeffreys) * forward + jeffreys * backward


def rloo_advantages(rewards: Tensor) -> Tensor:
    """R_i − mean_{j≠i} R_j over the last dim (K ≥ 2): (B, K) → (B, K)."""
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError("RLOO needs K >= 2 samples per prompt for its leave-one-out baseline")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)


def rloo_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta: float,
              K: float | None = None) -> Tensor:
    """Per-prompt RLOO loss −mean_i A_i log π_θ(y_i|x) with the KL-regularized sequence reward.
    Inputs (B, K) (sequence log-probs, reference log-probs, reward-model scores); returns (B,).
    The advantage is a constant (detached): only log π_θ carries the gradient. ``K``, the group
    size the sampler was asked for (a hyperparameter of the table row), is checked against the inputs."""
    if K is not None and rewards.shape[-1] != int(K):
        raise ValueError(f"RLOO was configured for K={int(K)} samples per prompt but got {rewards.shape[-1]}")
    R = rewards.float() - beta * (policy_logps.detach().float() - ref_logps.float())
    return -(rloo_advantages(R).detach() * policy_logps).mean(-1)


def grpo_advantages(rewards: Tensor, *, scale: bool = True) -> Tensor:
    """Â_i = (r_i − mean_j r_j) / (std_j r_j + 1e-4) over the last dim (K ≥ 2); with ``scale`` off
    (Dr. GRPO) r_i − mean_j r_j. (B, K) → (B, K), detached.

    std is the unbiased sample std (Bessel, K − 1) plus 1e-4, as TRL's ``GRPOTrainer`` (trl 1.16,
    ``scale_rewards="group"``: ``nanstd`` with Bessel's correction, ``/ (std + 1e-4)``): the paper
    writes std(r) without saying which; following TRL keeps our advantages equal to theirs, and the
    1e-4 keeps a group of equal rewards at Â = 0 instead of 0/0."""
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError("GRPO needs K >= 2 samples per prompt for its group baseline")
    r = _f(rewards).detach()
    adv = r - r.mean(-1, keepdim=True)
    return adv / (r.std(-1, keepdim=True) + 1e-4) if scale else adv


def grpo_loss(policy_logps: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor, rewards: Tensor, *,
              max_tokens: int, beta: float, clip: float, unbiased: float, K: float | None = None) -> Tensor:
    """GRPO: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models", arXiv 2402.03300, eq. 3 (outcome supervision, §4.1.2), as a loss = −J:
        J = 1/K Σ_i 1/|o_i| Σ_t [min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 − c, 1 + c) Â_i) − β k3_{i,t}],
        ρ_{i,t} = π_θ(o_{i,t}|q, o_{i,<t}) / π_old(o_{i,t}|q, o_{i,<t}),   Â_i = (r_i − mean r) / std r,
        k3_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1   (eq. 4, per token, an unbiased KL estimate ≥ 0),
    K samples o_i per prompt q (the paper's G).
    Dr. GRPO (``unbiased`` = 1.0): Liu et al., "Understanding R1-Zero-Like Training: A Critical
    Perspective", arXiv 2503.20783 (Fig. 1): Â_i = r_i − mean r (no std: its question-difficulty
    bias) and 1/``max_tokens``, a constant (the generation budget, max_new_tokens), in place of
    1/|o_i|: under GRPO each token of a short sample weighs more than one of a long sample, so
    a negative advantage is diluted by length (long wrong answers) and a positive one
    concentrated (short right ones). TRL's ``loss_type="dr_grpo"`` divides by
    max_completion_length the same way. Advantages: ``grpo_advantages`` (TRL's std convention).
    π_old is the sampling policy: ``old_logps`` is detached. With one optimizer step per rollout,
    as in our loop, it is the policy's own value (π_old = π_θ, ρ = 1; TRL passes
    ``per_token_logps.detach()`` likewise when num_iterations = 1), so the clip is inert and
    the loss's gradient is −1/K Σ_i Â_i/|o_i| Σ_t ∇log π_θ(o_{i,t}) plus the KL term's; it matters
    only when a rollout feeds several steps.
    Inputs: token log-probs ``policy_logps`` (with grad), ``old_logps``, ``ref_logps`` and the
    completion ``mask`` (B, K, T) (1 on the scored tokens of each sample, EOS included; values
    elsewhere are ignored), ``rewards`` (B, K). Returns (B,) per prompt. Reference, old
    log-probs and rewards detached. ``K`` (the row's sampler setting) is checked against the inputs.
    """
    if K is not None and rewards.shape[-1] != int(K):
        raise ValueError(f"GRPO was configured for K={int(K)} samples per prompt but got {rewards.shape[-1]}")
    m = mask.bool()
    logp = torch.where(m, _f(policy_logps), 0.0)  # (B, K, T); 0 off the completion: exp stays finite there
    ratio = torch.exp(logp - torch.where(m, _f(old_logps).detach(), 0.0))  # ρ_t
    adv = grpo_advantages(rewards, scale=not unbiased).unsqueeze(-1).to(ratio.dtype)  # (B, K, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
    log_ref_ratio = torch.where(m, _f(ref_logps).detach(), 0.0) - logp  # log π_ref/π_θ per token
    k3 = log_ref_ratio.exp() - log_ref_ratio - 1.0
    per_token = torch.where(m, surrogate - beta * k3, 0.0)  # (B, K, T)
    n_tokens = m.sum(-1)  # (B, K) |o_i|
    if unbiased and int(n_tokens.max()) > max_tokens:
        raise ValueError(f"Dr. GRPO's max_tokens={max_tokens} is below a sample's {int(n_tokens.max())} tokens")
    length = float(max_tokens) if unbiased else n_tokens.clamp(min=1).to(per_token.dtype)
    return -(per_token.sum(-1) / length).mean(-1)


@torch.no_grad()
def preference_metrics(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                       ref_rejected: Tensor, *, beta: float) -> dict[str, float]:
    """Batch means under TRL's DPOTrainer metric names (so curves line up with theirs):
    rewards/chosen = mean β Δ_w, rewards/rejected = mean β Δ_l, rewards/accuracies = mean 1[βΔ_w >
    βΔ_l], rewards/margins = mean β(Δ_w − Δ_l), logps/chosen, logps/rejected = mean policy
    log-probs. Inputs (B,)."""
    chosen = beta * (_f(policy_chosen) - _f(ref_chosen))  # (B,)
    rejected = beta * (_f(policy_rejected) - _f(ref_rejected))
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": _f(policy_chosen).mean().item(),
        "logps/rejected": _f(policy_rejected).mean().item(),
    }


@dataclass(frozen=True)
class PreferenceLoss:
    """One row of the preference-loss table."""

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, float]  # allowed hyperparameters and their defaults
    # pair: 4 × (B,) inputs; group: 3 × (B, K) inputs from offline data; online: group inputs the
    # training loop makes itself each step (K samples per prompt from the current policy, scored)
    # unpaired: (B,) examples each labelled desirable or not, with mismatched (x, y') pairs (KTO)
    kind: Literal["pair", "group", "online", "unpaired"]
    reference: str
    # pair rows only: fn also takes chosen_tokens, rejected_tokens (B,), the completion lengths
    lengths: bool = False
    # online rows only: fn takes token-level inputs (policy, old-policy and reference log-probs and
    # the completion mask (B, K, T), rewards (B, K)) and max_tokens, instead of (B, K) sequence sums
    tokens: bool = False


_EXO = "Ji et al., Towards Efficient Exact Optimization of Language Model Alignment, ICML 2024"
_DPO = "Rafailov et al., Direct Preference Optimization, NeurIPS 2023"
_IPO = "Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, AISTATS 2024"
_SIMPO = "Meng et al., SimPO: Simple Preference Optimization with a Reference-Free Reward, NeurIPS 2024"
_KTO = "Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization, ICML 2024"
_BOND = "Sessa et al., BOND: Aligning LLMs with Best-of-N Distillation, ICLR 2025"

# Allowed range per hyperparameter name: (predicate, text shown in the error).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0.0, "(0, inf)"),
    "beta_pi": (lambda v: v > 0.0, "(0, inf)"),
    "beta_r": (lambda v: v > 0.0, "(0, inf)"),
    "epsilon": (lambda v: 0.0 < v < 0.5, "(0, 0.5)"),  # ε ≥ ½ would prefer the rejected answer
    "K": (lambda v: v >= 2 and v == int(v), "integers >= 2"),  # samples per prompt
    "clip": (lambda v: 0.0 < v < 1.0, "(0, 1)"),  # GRPO's ratio clip: ρ in [1 − c, 1 + c]
    "unbiased": (lambda v: v in (0.0, 1.0), "0.0 (GRPO) or 1.0 (Dr. GRPO: no std, constant length normaliser)"),
    "tau": (lambda v: v > 0.0, "(0, inf)"),  # IPO's target margin 1/(2τ)
    "gamma": (lambda v: v >= 0.0, "[0, inf)"),  # SimPO's target reward margin
    "length_normalize": (lambda v: v in (0.0, 1.0), "0.0 (sequence sums) or 1.0 (per-token means)"),
    "lambda_d": (lambda v: v > 0.0, "(0, inf)"),  # KTO's weight of desirable examples
    "lambda_u": (lambda v: v > 0.0, "(0, inf)"),  # ... and of undesirable ones
    "N": (lambda v: v >= 1 and v == int(v), "integers >= 1"),  # BOND's best-of-N
    "jeffreys": (lambda v: 0.0 <= v <= 1.0, "[0, 1] (0 = forward KL, 1 = backward KL)"),
}
_RLOO = "Ahmadian et al., Back to Basics: Revisiting REINFORCE Style Optimization for RLHF, ACL 2024"
_GRPO = "Shao et al., DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models, 2024"
_DR_GRPO = "Liu et al., Understanding R1-Zero-Like Training: A Critical Perspective, 2025"

# β = 0.1 is the paper's IMDB setting (0.5 for TL;DR and HH); ε = 1e-3 is the TRL port's default.
# IPO: τ = 0.1 (TRL's default), on sequence log-ratios (eq. 17 as written; TRL averages per token).
# SimPO: β = 2.0, γ = 1.0 (γ/β = 0.5, the authors' README), per-token mean log-probs (eq. 6).
# KTO: β = 0.1, λ_D = λ_U = 1 (the paper's and TRL's defaults). BOND: N = 4, Jeffreys β = 0.5.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo_pref": PreferenceLoss("dpo_pref", dpo_pref_loss, {"beta": 0.1}, "pair", f"{_DPO}, eq. 7"),
    "dpo_rw": PreferenceLoss("dpo_rw", dpo_rw_loss, {"beta_pi": 0.1, "beta_r": 0.1}, "group",
                             f"{_EXO} (DPO-rw baseline)"),
    "exo_pref": PreferenceLoss("exo_pref", exo_pref_loss, {"beta": 0.1, "epsilon": 1e-3}, "pair",
                               f"{_EXO}, eq. 16"),
    "exo_rw": PreferenceLoss("exo_rw", exo_rw_loss, {"beta_pi": 0.1, "beta_r": 0.1}, "group",
                             f"{_EXO} (EXO-rw)"),
    "ipo": PreferenceLoss("ipo", ipo_loss, {"tau": 0.1, "length_normalize": 0.0}, "pair", f"{_IPO}, eq. 17",
                          lengths=True),
    "simpo": PreferenceLoss("simpo", simpo_loss, {"beta": 2.0, "gamma": 1.0, "length_normalize": 1.0}, "pair",
                            f"{_SIMPO}, eq. 6", lengths=True),
    "kto": PreferenceLoss("kto", kto_loss, {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0}, "unpaired",
                          f"{_KTO}, eq. 8"),
    "bond": PreferenceLoss("bond", bond_loss, {"N": 4, "jeffreys": 0.5}, "group",
                            f"{_BOND}, Jeffreys divergence (offline, over each prompt's K samples)"),
    # on-policy: K is the sampler's, beta the KL coefficient of the sequence reward (not a loss kwarg)
    "rloo": PreferenceLoss("rloo", rloo_loss, {"K": 4, "beta": 0.05}, "online", _RLOO),
    # GRPO: the paper's β = 0.04, ε = 0.2; K = 4 as RLOO's, so the two compare at equal rollouts
    "grpo": PreferenceLoss("grpo", grpo_loss, {"K": 4, "beta": 0.04, "clip": 0.2, "unbiased": 0.0}, "online",
                           f"{_GRPO}, eq. 3", tokens=True),
    "dr_grpo": PreferenceLoss("dr_grpo", grpo_loss, {"K": 4, "beta": 0.04, "clip": 0.2, "unbiased": 1.0},
                              "online", f"{_DR_GRPO} (Dr. GRPO, on {_GRPO}, eq. 3)", tokens=True),
}


def resolve_preference_loss(name: str, hyperparams: Mapping[str, float]) -> tuple[PreferenceLoss, dict[str, float]]:
    """Look up `name` in PREFERENCE_LOSSES and return it with its defaults updated by `hyperparams`.

    Unknown names, unknown or non-numeric hyperparameters and out-of-range values raise ValueError
    naming the offending key and the allowed values.
    """
    return resolve(PREFERENCE_LOSSES, name, hyperparams, _RANGES, "preference loss")
