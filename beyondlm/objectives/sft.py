"""Token-level supervised objectives: MLE and the alternatives argued for by TaiLr, MixCE and EMO.

Every loss is a pure function
    fn(logits (B, T, V), labels (B, T) long, mask (B, T) bool/float, **hyperparams) -> (B, T)
returning the per-token loss, exactly 0 where mask is 0 (a float mask multiplies the loss, so it
can carry weights). Logits and labels are already aligned: logits[:, t] predicts labels[:, t];
nothing here shifts. log_softmax is taken in float32 whatever the logits' dtype, so the result is
float32. Labels at masked positions may hold anything (e.g. -100); they are never indexed.
Reduce with `reduce_tokens`. The objective names live in one table, `OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from beyondlm.objectives.table import resolve


def _keep(mask: Tensor) -> Tensor:
    return mask != 0  # (B, T) bool


def _safe_labels(labels: Tensor, mask: Tensor) -> Tensor:
    # Masked positions may hold ignore indices such as -100; point them at token 0 so gather is valid.
    return labels.masked_fill(~_keep(mask), 0)


def _apply_mask(loss: Tensor, mask: Tensor) -> Tensor:
    # where (not just multiply) so a masked inf/nan can never leak into the value: (B, T)
    return torch.where(_keep(mask), loss * mask.to(loss.dtype), torch.zeros_like(loss))


def _token_logp(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """log q_t = log softmax(logits)[labels] in float32: (B, T). Through the fused cross-entropy
    kernel (log-softmax + gather in one op, no (B, T, V) log-prob tensor kept for backward)."""
    B, T, V = logits.shape
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(B * T, V), _safe_labels(labels, mask).reshape(B * T), reduction="none"
    )
    return -nll.view(B, T)


def mle_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Maximum likelihood: ℓ_t = −log q_θ(y_t | y_<t). Shapes (B,T,V),(B,T),(B,T) -> (B,T)."""
    return _apply_mask(-_token_logp(logits, labels, mask), mask)


def tailr_loss(logits: Tensor, labels: Tensor, mask: Tensor, *, gamma: float, w_min: float) -> Tensor:
    """TaiLr: Ji et al., "Tailoring Language Generation Models under Total Variation Distance", ICLR 2023.

    Eq. for the token weight (their §3.3, as their fairseq criterion computes it):
        w_t = sg(clamp(p_t / (γ + (1 − γ) p_t), min=w_min, max=1)),   ℓ_t = w_t · (−log p_t),
    p_t = q_θ(y_t | y_<t) from this same forward pass. γ = 1 gives w = p (the TVD gradient, before
    clamping); γ → 0 gives w → 1 (MLE). Shapes (B,T,V),(B,T),(B,T) -> (B,T).
    """
    logp = _token_logp(logits, labels, mask)  # (B, T)
    p = logp.detach().exp()
    weight = (p / (gamma + (1.0 - gamma) * p)).clamp(min=w_min, max=1.0)
    return _apply_mask(weight * -logp, mask)


def mixce_loss(logits: Tensor, labels: Tensor, mask: Tensor, *, eta: float) -> Tensor:
    """MixCE: Zhang et al., "MixCE: Training Autoregressive Language Models by Mixing Forward and
    Reverse Cross-Entropies", ACL 2023, token loss of their final approximation:
        ℓ_t = [η + (1 − η) · sg(q_t)] · (−log q_t),   q_t = q_θ(y_t | y_<t).
    η = 1 is MLE. The weight is per token (the authors' code makes it a batch scalar with stock
    `transformers`, which returns a mean loss). Shapes (B,T,V),(B,T),(B,T) -> (B,T).
    """
    logp = _token_logp(logits, labels, mask)  # (B, T)
    weight = eta + (1.0 - eta) * logp.detach().exp()
    return _apply_mask(weight * -logp, mask)


# ℓ_EMO is a mean of costs in [0, 2]; below this it is 0 up to rounding and the ratio would explode.
_EMO_EPS = 1e-6


def emo_cost(logits: Tensor, labels: Tensor, mask: Tensor, embedding: Tensor) -> Tensor:
    """EMO transport cost to a one-hot target: ℓ_EMO,t = Σ_j q_j (1 − cos(e_j, e_{y_t})).

    Ren et al., "EMO: Earth Mover Distance Optimization for Auto-Regressive Language Modeling",
    ICLR 2024, eq. of the DEMD with one-hot data distribution. Cost C_ij = 1 − cos(e_i, e_j) over the
    rows of `embedding` (V, D), L2-normalized and DETACHED (the cost is fixed, only q learns).
    Since Σ_j q_j = 1 this is 1 − (q @ Ê) · ê_y, so no (V, V) or (B, T, V) cosine matrix is built.
    q = softmax(logits) keeps its gradient. Shapes -> (B, T), masked to 0.
    """
    unit = F.normalize(embedding.detach().to(device=logits.device, dtype=torch.float32), dim=-1)  # (V, D)
    q = torch.softmax(logits.float(), dim=-1)  # (B, T, V)
    expected_emb = q @ unit  # (B, T, D): Σ_j q_j ê_j
    target_emb = unit[_safe_labels(labels, mask)]  # (B, T, D): ê_y
    cost = 1.0 - (expected_emb * target_emb).sum(-1)  # (B, T)
    return _apply_mask(cost.clamp_min(0.0), mask)  # clamp: rounding can dip just below 0


def emo_loss(logits: Tensor, labels: Tensor, mask: Tensor, *, embedding: Tensor) -> Tensor:
    """EMO combined with MLE (Ren et al., ICLR 2024, final training loss of their code):
        ℓ_t = ½ [ℓ_MLE + sg(ℓ_MLE / ℓ_EMO) · ℓ_EMO].
    The rescaling makes the EMO term equal ℓ_MLE in value, so the value is ℓ_MLE while the gradient
    is half MLE's and half EMO's. embedding: (V, D) output-embedding rows, detached inside.
    Shapes (B,T,V),(B,T),(B,T) -> (B,T).
    """
    mle = mle_loss(logits, labels, mask)  # (B, T)
    emo = emo_cost(logits, labels, mask, embedding)  # (B, T)
    scale = (mle / emo.clamp_min(_EMO_EPS)).detach()
    return 0.5 * (mle + scale * emo)


def reduce_tokens(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean over unmasked tokens: Σ loss / Σ mask (a scalar; 0 if the batch has no tokens)."""
    return per_token.sum() / mask.to(per_token.dtype).sum().clamp_min(1.0)


@dataclass(frozen=True)
class Objective:
    """One row of the objective table."""

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, float]  # allowed hyperparameters and their defaults
    needs_embedding: bool
    reference: str


# Allowed range per hyperparameter name: (predicate, text shown in the error).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "gamma": (lambda v: 0.0 < v <= 1.0, "(0, 1]"),
    "w_min": (lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
    "eta": (lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
}

OBJECTIVES: dict[str, Objective] = {
    "mle": Objective("mle", mle_loss, {}, False, "maximum likelihood (token cross-entropy)"),
    # Authors' settings: synthetic γ=1e-7 w_min=0.2 (nearly MLE); IWSLT14 γ=0.1 w_min=0.3;
    # Gigaword γ=0.8 w_min=0.2. Our default γ=0.1 actually departs from MLE; sweep γ.
    "tailr": Objective(
        "tailr", tailr_loss, {"gamma": 0.1, "w_min": 0.2}, False,
        "Ji et al., Tailoring Language Generation Models under Total Variation Distance, ICLR 2023",
    ),
    # Authors' best η: WikiText 0.1, WebText 0.3, WritingPrompts 0.7.
    "mixce": Objective(
        "mixce", mixce_loss, {"eta": 0.1}, False,
        "Zhang et al., MixCE: Mixing Forward and Reverse Cross-Entropies, ACL 2023",
    ),
    "emo": Objective(
        "emo", emo_loss, {}, True,
        "Ren et al., EMO: Earth Mover Distance Optimization for Auto-Regressive LM, ICLR 2024",
    ),
}


def resolve_objective(name: str, hyperparams: Mapping[str, float]) -> tuple[Objective, dict[str, float]]:
    """Look up `name` in OBJECTIVES and return it with its defaults updated by `hyperparams`.

    Unknown names, unknown or non-numeric hyperparameters and out-of-range values raise ValueError
    naming the offending key and the allowed values.
    """
    return resolve(OBJECTIVES, name, hyperparams, _RANGES, "objective")


def sft_token_loss(
    name: str,
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    hyperparams: Mapping[str, float],
    embedding: Tensor | None = None,
) -> Tensor:
    """Per-token loss (B, T) of the objective `name` from OBJECTIVES, with validated hyperparameters.

    `embedding` (V, D) is required by objectives with needs_embedding (EMO) and ignored otherwise.
    """
    obj, params = resolve_objective(name, hyperparams)
    if obj.needs_embedding:
        if embedding is None:
            raise ValueError(f"objective {name!r} needs an output embedding (V, D); got embedding=None")
        return obj.fn(logits, labels, mask, embedding=embedding, **params)
    return obj.fn(logits, labels, mask, **params)
