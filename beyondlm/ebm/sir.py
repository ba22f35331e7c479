"""Sampling-importance-resampling decoding from p* ∝ p_θ·exp(−μᵀf) (ICLR 2024).

"Energy-based decoding by evaluation functions" (ICLR 2024) decodes from the energy-based
model p*(x | prompt) ∝ p_θ(x | prompt)·exp(−μᵀf(prompt, x)) by SIR: draw M candidates from the
proposal p_θ, weight each by w_j ∝ exp(−μᵀf_j) (the ratio p*/p_θ up to the prompt's
normaliser), resample one. As M → ∞ the chosen text is distributed as p*; M = 1 is plain
sampling. The per-prompt effective sample size (Σw)²/Σw² of the weights says how far p* is
from the proposal. The proposal must be p_θ itself (temperature 1, no top-k/top-p) for the
target to be p*; with a truncated sampler q the target becomes q·exp(−μᵀf) instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import log_softmax

from beyondlm.ebm.features import check_names, compute_features
from beyondlm.sampling import SamplingConfig, sample_scored


def sir_weights(features: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Normalised SIR weights softmax_j(−μᵀf_j) per prompt: features (N, M, K) → (N, M)."""
    F = np.asarray(features, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if F.ndim != 3 or F.shape[2] != mu.shape[0] or F.shape[1] < 1:
        raise ValueError(f"features must be (N, M, K) with K = {mu.shape[0]}, got {F.shape}")
    if not (np.all(np.isfinite(F)) and np.all(np.isfinite(mu))):
        raise ValueError("non-finite features or mu")
    return np.exp(log_softmax(-F @ mu, axis=1))  # (N, M); logsumexp-stable


def sir_select(features: np.ndarray, mu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One resampled candidate index per prompt, (N,) int: j with probability w_j (inverse CDF)."""
    w = sir_weights(features, mu)  # (N, M)
    u = rng.random(len(w))[:, None]  # (N, 1)
    idx = (np.cumsum(w, axis=1) < u).sum(axis=1)  # first j with cumsum ≥ u
    return np.minimum(idx, w.shape[1] - 1)  # guard: cumsum may end a hair below 1


def _diagnostics(names, F: np.ndarray, w: np.ndarray, idx: np.ndarray, cfg) -> dict:
    """JSON-friendly summary: weight ESS per prompt and mean features, proposal vs chosen."""
    ess = 1.0 / np.sum(w**2, axis=1)  # (N,) in candidates, 1..M
    chosen = F[np.arange(len(F)), idx]  # (N, K)
    out = {
        "M": int(F.shape[1]), "ess_mean": float(ess.mean()), "ess_min": float(ess.min()),
        "max_weight_mean": float(w.max(axis=1).mean()), "chosen_index": idx.tolist(),
        "proposal_is_model": bool(cfg.temperature == 1.0 and cfg.top_k == 0 and cfg.top_p == 1.0),
    }
    for k, name in enumerate(names):
        out[f"features/proposal/{name}"] = float(F[:, :, k].mean())
        out[f"features/chosen/{name}"] = float(chosen[:, k].mean())
    return out


def sample_with_features(model, prompts, names, cfg: SamplingConfig, *, eos_id: int, pad_id: int,
                         seed: int, tokenizer=None, embedder: str = "lm", batch_size: int = 64):
    """One sample per prompt row and its evaluation functions, (conts, F (N, K)), with the
    model-based features (nll; coherence under the 'lm' embedder) read off the sampling pass."""
    states = "coherence" in names and embedder == "lm"
    conts, scores = sample_scored(model, prompts, cfg, eos_id=eos_id, pad_id=pad_id, seed=seed,
                                  states=states)
    F = compute_features(names, prompts, conts, model=model, tokenizer=tokenizer, eos_id=eos_id,
                         pad_id=pad_id, batch_size=batch_size, embedder=embedder,
                         lm_logps=scores.logps,
                         lm_states=(scores.prompt_states, scores.completion_states) if states else None)
    return conts, F


def sir_decode(
    model,
    prompts: Sequence[Sequence[int]],
    mu: np.ndarray,
    names: Sequence[str],
    M: int,
    sampling_cfg: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
    seed: int,
    tokenizer=None,
    embedder: str = "lm",
    batch_size: int = 64,
) -> tuple[list[list[int]], dict]:
    """One continuation per prompt drawn by SIR from p* with M candidates each.

    The N·M candidates come from ONE batched ``sample_scored`` call (each prompt repeated M
    times, candidates of prompt i at rows i·M .. i·M+M−1) which also returns log p_θ of each
    candidate and the hidden states the LM-based features need, so scoring costs no second forward
    pass: generation is the cost. Returns (chosen continuations, diagnostics).
    """
    names = check_names(names)
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape != (len(names),):
        raise ValueError(f"mu has shape {mu.shape} but there are {len(names)} names {names}")
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    repeated = [list(p) for p in prompts for _ in range(M)]  # (N·M,) prompt-major
    cands, F = sample_with_features(model, repeated, names, sampling_cfg, eos_id=eos_id, pad_id=pad_id,
                                    seed=seed, tokenizer=tokenizer, embedder=embedder,
                                    batch_size=batch_size)
    F = F.reshape(len(prompts), M, len(names))  # (N, M, K)
    w = sir_weights(F, mu)
    idx = sir_select(F, mu, np.random.default_rng(seed))
    chosen = [cands[i * M + int(j)] for i, j in enumerate(idx)]
    return chosen, _diagnostics(names, F, w, idx, sampling_cfg)
