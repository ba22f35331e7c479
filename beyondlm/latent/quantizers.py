"""Discretizers of a latent plan: Gumbel-softmax (the authors' choice) and nearest-neighbour VQ.

Both map encoder outputs z_e (B, L, D) on L code slots to codes (B, L) over a codebook E (K, D)
and to the vectors the decoder sees (B, L, D). Padded slots (``mask`` 0) get zero vectors and take
no part in the auxiliary losses, the EMA update or the usage statistics.

- **Gumbel-softmax** (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax";
  used for the plan codes of the latent-plan paper, EMNLP'21): posterior q(k|x) = softmax(ℓ) with
  ℓ_k = −‖z_e − e_k‖²; training feeds y·E with y = softmax((ℓ + g)/τ), g ~ Gumbel(0, 1), and τ
  annealed as τ(step) = max(τ_min, τ0·exp(−r·step)) (authors: τ_min 0.1, τ0 0.9). The auxiliary
  loss −α·H(q̄) (authors: α = 0.1) rewards spreading q̄, the posterior averaged over the batch and
  its code slots, over the codebook; with ``bonus: mutual_info`` it is −α·(H(q̄) − E H(q)), the
  mutual information between slot and code, which also asks each slot's posterior to be
  confident (H(q̄) alone is maximal for a posterior that is uniform at every slot, a plan that
  says nothing). Eval: argmax ℓ (the nearest code), one-hot.
  Why distance logits rather than a free linear head: both discretizers then share one geometry
  (argmax q = nearest code), so a codebook vector given as z_e comes back as itself in both.
- **Nearest-neighbour VQ** (van den Oord et al. 2017, "Neural Discrete Representation Learning",
  Eq. 3 and Appendix A.1): k = argmin_k ‖z_e − e_k‖², straight-through gradients, commitment loss
  β·‖z_e − sg(e_k)‖² (authors: β = 0.25), codebook = EMA of the encoder outputs assigned to each
  code with Laplace-smoothed counts (decay γ = 0.99).

The auxiliary loss of a quantizer is already weighted (−α·H or β·commitment) and is a per-token
quantity: the training objective adds it once per target token (see ``model.plan_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beyondlm.config import check_choice

BONUSES = ("entropy", "mutual_info")  # the Gumbel discretizer's auxiliary bonus (GumbelConfig.bonus)


# ----------------------------------------------------------------------------- pure functions
def gumbel_tau(step: int, *, tau0: float, tau_min: float, rate: float) -> float:
    """τ(step) = max(τ_min, τ0·exp(−rate·step)), the annealed Gumbel-softmax temperature."""
    return max(tau_min, tau0 * math.exp(-rate * step))


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """‖z − e_k‖² for every vector and code: z (..., D), codebook (K, D) → (..., K)."""
    d = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codebook.T + codebook.pow(2).sum(-1)
    return d.clamp_min(0.0)  # expanded form can dip below 0 by rounding


def _entropy(p: Tensor) -> Tensor:
    """Entropy in nats over the last axis; 0·log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def mean_code_entropy(probs: Tensor, mask: Tensor) -> Tensor:
    """H(q̄) in nats, q̄ = the mean of ``probs`` over the valid slots of the whole batch.

    probs (B, L, K) posterior per slot, mask (B, L) → scalar. 0·log 0 = 0.
    """
    m = mask.to(probs.dtype).unsqueeze(-1)  # (B, L, 1)
    q = (probs * m).sum((0, 1)) / m.sum().clamp_min(1.0)  # (K,)
    return _entropy(q)


def mean_slot_entropy(probs: Tensor, mask: Tensor) -> Tensor:
    """E[H(q)] in nats: the entropy of ``probs`` (B, L, K) at each valid slot of ``mask`` (B, L),
    averaged over them → scalar. 0·log 0 = 0."""
    h = _entropy(probs)  # (B, L)
    m = mask.to(probs.dtype)
    return (h * m).sum() / m.sum().clamp_min(1.0)


def commitment_loss(z_e: Tensor, z_q: Tensor, mask: Tensor) -> Tensor:
    """‖z_e − sg(z_q)‖² averaged over dimensions (as Sonnet's VQ-VAE) and valid slots.

    z_e, z_q (B, L, D), mask (B, L) → scalar; gradients reach z_e only.
    """
    per_slot = (z_e - z_q.detach()).pow(2).mean(-1)  # (B, L)
    m = mask.to(per_slot.dtype)
    return (per_slot * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def ema_update(cluster_size: Tensor, embed_sum: Tensor, z: Tensor, codes: Tensor, *, decay: float,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA step of the VQ-VAE codebook (van den Oord et al. 2017, Appendix A.1).

    N_k ← γN_k + (1−γ)n_k;  m_k ← γm_k + (1−γ)Σ_{i: k_i = k} z_i;  e_k = m_k / Ñ_k with the
    Laplace-smoothed counts Ñ_k = (N_k + ε)/(n + Kε)·n, n = Σ_k N_k (as Sonnet's VectorQuantizerEMA).
    cluster_size (K,), embed_sum (K, D), z (N, D) the valid encoder outputs, codes (N,) their
    nearest codes → (cluster_size, embed_sum, codebook (K, D)).
    """
    n_codes = cluster_size.shape[0]
    onehot = F.one_hot(codes, n_codes).to(z.dtype)  # (N, K)
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * (onehot.T @ z)  # (K, D)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + n_codes * eps) * n  # (K,)
    return cluster_size, embed_sum, embed_sum / smoothed.unsqueeze(-1)


def codebook_usage(codes: Tensor, mask: Tensor, n_codes: int) -> dict[str, float]:
    """Usage of the codebook over a set of code slots: codes, mask (N, L) → metrics.

    perplexity = exp(H(p̂)) of the empirical code distribution p̂ over the valid slots (K when
    usage is uniform, 1 when one code is used); dead_codes = codes never used.
    """
    counts = torch.bincount(codes[mask.bool()].flatten(), minlength=n_codes).double()  # (K,)
    p = counts[counts > 0] / counts.sum().clamp_min(1.0)
    entropy = float(-(p * p.log()).sum())
    dead = int((counts == 0).sum())
    return {"perplexity": math.exp(entropy), "entropy": entropy, "dead_codes": dead,
            "used_codes": n_codes - dead, "n_slots": int(counts.sum())}


# ----------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class GumbelConfig:
    """``vq.model.gumbel``: the authors' discretizer."""

    tau0: float = 0.9
    tau_min: float = 0.1
    rate: float = 0.02  # per optimizer step: τ reaches τ_min after ln(τ0/τ_min)/rate ≈ 110 steps
    entropy_weight: float = 0.1  # α of the bonus
    # the bonus: "entropy" α·H(q̄) (the authors': codes used evenly, but also maximal for a posterior
    # that is uniform everywhere, i.e. says nothing) | "mutual_info" α·(H(q̄) − E H(q)) = α·I(slot; code):
    # codes used evenly *and* each slot's posterior confident
    bonus: str = "entropy"
    hard: bool = False  # straight-through one-hot samples in training (soft y·E when false)

    def __post_init__(self) -> None:
        check_choice("vq.model.gumbel.bonus", self.bonus, BONUSES)


@dataclass(frozen=True)
class NearestConfig:
    """``vq.model.nearest``: VQ-VAE with an EMA codebook."""

    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # EMA decay γ
    eps: float = 1.0e-5  # Laplace smoothing of the counts


@dataclass
class Quantized:
    codes: Tensor  # (B, L) long
    vectors: Tensor  # (B, L, D), zero on padded slots
    aux_loss: Tensor  # scalar, weighted, added per target token to the NLL
    entropy: Tensor  # H(q̄) (gumbel: posterior probabilities; nearest: hard assignments)


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax over distance logits; the codebook is learned by gradient."""

    def __init__(self, n_codes: int, dim: int, cfg: GumbelConfig):
        super().__init__()
        self.cfg = cfg
        # N(0, 1/D): logits of a fresh encoder differ by O(1) across codes (no early collapse)
        self.codebook = nn.Parameter(torch.randn(n_codes, dim) / math.sqrt(dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved: τ resumes

    @property
    def tau(self) -> float:
        c = self.cfg
        return gumbel_tau(int(self.step), tau0=c.tau0, tau_min=c.tau_min, rate=c.rate)

    def lookup(self, codes: Tensor) -> Tensor:
        return self.codebook[codes]  # (B, L, D)

    def forward(self, z_e: Tensor, mask: Tensor) -> Quantized:
        logits = -squared_distances(z_e, self.codebook)  # (B, L, K)
        probs = logits.softmax(-1)
        entropy = mean_code_entropy(probs, mask)
        bonus = entropy - mean_slot_entropy(probs, mask) if self.cfg.bonus == "mutual_info" else entropy
        if self.training:
            y = F.gumbel_softmax(logits, tau=self.tau, hard=self.cfg.hard)  # (B, L, K)
            codes, vectors = y.argmax(-1), y @ self.codebook
        else:
            codes = logits.argmax(-1)
            vectors = self.codebook[codes]
        vectors = vectors * mask.unsqueeze(-1).to(vectors.dtype)
        return Quantized(codes, vectors, -self.cfg.entropy_weight * bonus, entropy.detach())


class NearestQuantizer(nn.Module):
    """Nearest-neighbour VQ, straight-through, commitment loss, EMA codebook (all buffers).

    The codebook starts from K random encoder outputs of the first training batch (the
    data-dependent init of Jukebox / vector-quantize-pytorch) so no code starts far from the data;
    the EMA state starts at counts 1 and sums = that codebook, so e_k = m_k / N_k holds from step 0.
    """

    def __init__(self, n_codes: int, dim: int, cfg: NearestConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("codebook", torch.randn(n_codes, dim) / math.sqrt(dim))
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # unused; same API

    def lookup(self, codes: Tensor) -> Tensor:
        return self.codebook[codes]  # (B, L, D)

    @torch.no_grad()
    def _init_from(self, z: Tensor) -> None:
        """Codebook = K encoder outputs drawn without replacement (with, if fewer than K)."""
        k = self.codebook.shape[0]
        idx = torch.randperm(len(z))[:k] if len(z) >= k else torch.randint(len(z), (k,))
        self.codebook.copy_(z[idx])
        self.embed_sum.copy_(z[idx])
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def forward(self, z_e: Tensor, mask: Tensor) -> Quantized:
        valid = mask.bool()
        if self.training and not bool(self.initialized):
            self._init_from(z_e.detach()[valid])
        codes = squared_distances(z_e.detach(), self.codebook).argmin(-1)  # (B, L)
        z_q = self.codebook[codes]  # (B, L, D), before this step's EMA update
        commit = commitment_loss(z_e, z_q, mask)
        if self.training:
            size, total, book = ema_update(self.cluster_size, self.embed_sum, z_e.detach()[valid],
                                           codes[valid], decay=self.cfg.decay, eps=self.cfg.eps)
            self.cluster_size.copy_(size), self.embed_sum.copy_(total), self.codebook.copy_(book)
            vectors = z_e + (z_q - z_e).detach()  # straight-through: ∂vectors/∂z_e = I
        else:
            vectors = z_q
        vectors = vectors * mask.unsqueeze(-1).to(vectors.dtype)
        onehot = F.one_hot(codes, self.codebook.shape[0]).to(z_e.dtype)  # (B, L, K)
        return Quantized(codes, vectors, self.cfg.beta * commit, mean_code_entropy(onehot, mask))


# The one table of discretizer names: config validation, errors and tests read it.
DISCRETIZERS = {"gumbel": GumbelQuantizer, "nearest": NearestQuantizer}
