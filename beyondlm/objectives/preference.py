"""Preference objectives: DPO and EXO, pairwise (-pref) and over groups of K scored samples (-rw),
IPO and the reference-free SimPO on pairs, and the on-policy RLOO baseline (groups it samples itself).

Every loss is a pure function of sequence log-probabilities (already summed over response tokens,
prompt masked, EOS included; see `beyondlm.logprobs.sequence_logps`) returning the per-example loss:

    pair:  fn(policy_chosen (B,), policy_rejected (B,), ref_chosen (B,), ref_rejected (B,), *, ...) -> (B,)
    group: fn(policy_logps (B, K), ref_logps (B, K), rewards (B, K), *, ...) -> (B,)

A pair row with ``lengths=True`` (IPO, SimPO) also takes ``chosen_tokens``, ``rejected_tokens`` (B,):
the completion lengths |y| in tokens, counted as the log-probs count them (response tokens, EOS
included), for the per-token averages ℓ/|y| of its ``length_normalize`` switch.

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
    kind: Literal["pair", "group", "online"]
    reference: str
    # pair rows only: fn also takes chosen_tokens, rejected_tokens (B,), the completion lengths
    lengths: bool = False


_EXO = "Ji et al., Towards Efficient Exact Optimization of Language Model Alignment, ICML 2024"
_DPO = "Rafailov et al., Direct Preference Optimization, NeurIPS 2023"
_IPO = "Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, AISTATS 2024"
_SIMPO = "Meng et al., SimPO: Simple Preference Optimization with a Reference-Free Reward, NeurIPS 2024"

# Allowed range per hyperparameter name: (predicate, text shown in the error).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0.0, "(0, inf)"),
    "beta_pi": (lambda v: v > 0.0, "(0, inf)"),
    "beta_r": (lambda v: v > 0.0, "(0, inf)"),
    "epsilon": (lambda v: 0.0 < v < 0.5, "(0, 0.5)"),  # ε ≥ ½ would prefer the rejected answer
    "K": (lambda v: v >= 2 and v == int(v), "integers >= 2"),  # samples per prompt
    "tau": (lambda v: v > 0.0, "(0, inf)"),  # IPO's target margin 1/(2τ)
    "gamma": (lambda v: v >= 0.0, "[0, inf)"),  # SimPO's target reward margin
    "length_normalize": (lambda v: v in (0.0, 1.0), "0.0 (sequence sums) or 1.0 (per-token means)"),
}
_RLOO = "Ahmadian et al., Back to Basics: Revisiting REINFORCE Style Optimization for RLHF, ACL 2024"

# β = 0.1 is the paper's IMDB setting (0.5 for TL;DR and HH); ε = 1e-3 is the TRL port's default.
# IPO: τ = 0.1 (TRL's default), on sequence log-ratios (eq. 17 as written; TRL averages per token).
# SimPO: β = 2.0, γ = 1.0 (γ/β = 0.5, the authors' README), per-token mean log-probs (eq. 6).
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
    # on-policy: K is the sampler's, beta the KL coefficient of the sequence reward (not a loss kwarg)
    "rloo": PreferenceLoss("rloo", rloo_loss, {"K": 4, "beta": 0.05}, "online", _RLOO),
}


def resolve_preference_loss(name: str, hyperparams: Mapping[str, float]) -> tuple[PreferenceLoss, dict[str, float]]:
    """Look up `name` in PREFERENCE_LOSSES and return it with its defaults updated by `hyperparams`.

    Unknown names, unknown or non-numeric hyperparameters and out-of-range values raise ValueError
    naming the offending key and the allowed values.
    """
    return resolve(PREFERENCE_LOSSES, name, hyperparams, _RANGES, "preference loss")
