"""Monte Carlo estimators of distances between the data distribution p_d and a model p_θ.

All inputs are 1-D numpy arrays of *whole-sequence* log-probabilities (natural log, nats), one
entry per sample; outputs are plain floats wrapped in `Estimate` (mean, standard error, n). These
need p_d to be known exactly, as for the synthetic language (METHODS.md, "The synthetic language
... and exact metrics"). Every estimator is a sample mean of i.i.d. per-sample values, so it is
unbiased for its expectation, consistent as n → ∞, and its standard error is the sample standard
deviation (ddof=1) over √n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo mean with its standard error and sample count."""

    mean: float
    stderr: float
    n: int

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flat metric keys: `{prefix: mean, prefix_se: stderr, prefix_n: n}`."""
        return {prefix: self.mean, f"{prefix}_se": self.stderr, f"{prefix}_n": self.n}


def _as_1d(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per sample), got shape {arr.shape}")
    return arr


def _paired(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a, name_a), _as_1d(b, name_b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} differ in length: {a.shape} vs {b.shape}")
    return a, b


def _require_finite(arr: np.ndarray, name: str) -> None:
    # The sampling distribution's own log-probs are finite on its samples; -inf or nan means a bug upstream.
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite on the samples drawn from it")


def mean_estimate(values: np.ndarray) -> Estimate:
    """Sample mean of i.i.d. values with stderr = std(ddof=1)/√n (0 when n < 2).

    Raises ValueError on empty or non-finite input: an infinite or nan sample makes the mean
    meaningless, and the caller should decide what it means (see `reverse_kl`).
    """
    arr = _as_1d(values, "values")
    if arr.size == 0:
        raise ValueError("cannot estimate a mean from zero samples")
    _require_finite(arr, "values")
    n = int(arr.size)
    stderr = float(arr.std(ddof=1) / np.sqrt(n)) if n >= 2 else 0.0
    return Estimate(mean=float(arr.mean()), stderr=stderr, n=n)


def forward_kl(logp_data: np.ndarray, logp_model: np.ndarray) -> Estimate:
    """Forward KL(p_d‖p_θ) = E_{x∼p_d}[log p_d(x) − log p_θ(x)].

    Samples: x drawn from p_d (the held-out test set); both arrays are log-probs of those whole
    sequences. Unbiased and consistent; stderr = std(ddof=1)/√n of the per-sample log-ratio.
    Mode-covering: it is large when the model misses sequences the data produces (coverage).
    """
    logp_data, logp_model = _paired(logp_data, logp_model, "logp_data", "logp_model")
    _require_finite(logp_data, "logp_data")
    return mean_estimate(logp_data - logp_model)


def reverse_kl(logp_model: np.ndarray, logp_data: np.ndarray) -> tuple[Estimate | None, float]:
    """Reverse KL(p_θ‖p_d) = E_{x∼p_θ}[log p_θ(x) − log p_d(x)], and the fraction of impossible samples.

    Samples: x drawn from the model p_θ itself; both arrays are log-probs of those sequences.
    A sample with log p_d(x) = −inf is one the language cannot produce: if any exists with
    positive model probability, the true reverse KL is INFINITE. We therefore return
    (estimate over the finite samples only, or None when there are none; fraction impossible).
    The finite-sample estimate is the KL conditioned on "possible" samples, NOT the reverse KL,
    whenever the fraction is > 0. On the finite samples it is an unbiased, consistent sample mean
    with stderr = std(ddof=1)/√n. Mode-seeking: large when the model puts mass where data has little.
    """
    logp_model, logp_data = _paired(logp_model, logp_data, "logp_model", "logp_data")
    if logp_model.size == 0:
        raise ValueError("cannot estimate reverse KL from zero samples")
    _require_finite(logp_model, "logp_model")
    if np.any(np.isnan(logp_data)) or np.any(logp_data == np.inf):
        raise ValueError("logp_data must be finite or -inf")
    possible = np.isfinite(logp_data)
    frac_impossible = float(1.0 - possible.mean())
    if not possible.any():
        return None, frac_impossible
    return mean_estimate(logp_model[possible] - logp_data[possible]), frac_impossible


def total_variation(logp_model: np.ndarray, logp_data: np.ndarray) -> Estimate:
    """TVD(p_θ, p_d) = E_{x∼p_θ}[max(0, 1 − p_d(x)/p_θ(x))] = Σ_x max(0, p_θ(x) − p_d(x)).

    Samples: x drawn from the model p_θ (swap the roles to estimate from p_d samples). Each value
    lies in [0, 1], so the sample mean is unbiased, consistent and has finite variance; stderr =
    std(ddof=1)/√n. Computed in log space: 1 − exp(min(0, log p_d − log p_θ)) via expm1, so a huge
    ratio never overflows and a tiny one keeps precision; impossible samples (log p_d = −inf)
    contribute exactly 1.
    """
    logp_model, logp_data = _paired(logp_model, logp_data, "logp_model", "logp_data")
    _require_finite(logp_model, "logp_model")
    if np.any(np.isnan(logp_data)) or np.any(logp_data == np.inf):
        raise ValueError("logp_data must be finite or -inf")
    log_ratio = np.minimum(logp_data - logp_model, 0.0)  # clipped: ratio > 1 contributes 0
    return mean_estimate(-np.expm1(log_ratio))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Perplexity exp(Σ NLL / #tokens) from a summed token negative log-likelihood in nats."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return float(np.exp(nll_sum / n_tokens))


def per_token(est: Estimate, mean_length: float) -> Estimate:
    """Rescale a per-sequence estimate to nats per token by dividing mean and stderr by the mean length.

    The mean length is treated as a constant (its own sampling error is ignored).
    """
    if mean_length <= 0:
        raise ValueError(f"mean_length must be positive, got {mean_length}")
    return Estimate(mean=est.mean / mean_length, stderr=est.stderr / mean_length, n=est.n)
