"""Monte Carlo estimators of distances between the data distribution p_d and a model p_θ.

All inputs are 1-D numpy arrays of *whole-sequence* log-probabilities (natural log, nats), one
entry per sample; outputs are plain floats wrapped in `Estimate` (mean, standard error, n). These
need p_d to be known exactly, as for the synthetic language (METHODS.md, "The synthetic language
... and exact metrics"). Most estimators are a sample mean of i.i.d. per-sample values, so they
are unbiased for their expectation, consistent as n → ∞, and their standard error is the sample
standard deviation (ddof=1) over √n. Ratios (per-token values) and the conditional reverse KL are
smooth functions of several such means: consistent, biased by O(1/n), with a delta-method stderr.
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
    meaningless, and the caller should decide what it means (see `conditional_reverse_kl`).
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


def _delta(columns: np.ndarray, value: float, grad: np.ndarray) -> Estimate:
    """A smooth function f of column means, with the delta-method standard error.

    columns (n, k): per-sample values whose means m enter f; ``value`` = f(m), ``grad`` = ∇f(m).
    Linearised influence ψ_i = (Z_i − m)·∇f(m); stderr = std(ψ, ddof=1)/√n (consistent; the
    plug-in f(m) is biased by O(1/n)).
    """
    n = len(columns)
    psi = (columns - columns.mean(0)) @ grad  # (n,)
    stderr = float(psi.std(ddof=1) / np.sqrt(n)) if n >= 2 else 0.0
    return Estimate(mean=float(value), stderr=stderr, n=int(n))


def ratio_estimate(values: np.ndarray, weights: np.ndarray) -> Estimate:
    """Ratio estimator R = Σ v_i / Σ w_i of E[v]/E[w] (e.g. nats per token: v = nats per sequence,
    w = tokens per sequence), stderr by the delta method: std(v − R·w, ddof=1)/(√n · mean w).
    Consistent; biased by O(1/n). Long sequences weigh more than in a mean of per-sequence ratios:
    this is the per-token quantity of the whole corpus."""
    v, w = _paired(values, weights, "values", "weights")
    if v.size == 0 or w.sum() <= 0:
        raise ValueError("a ratio estimate needs samples with positive total weight")
    _require_finite(v, "values")
    r = float(v.sum() / w.sum())
    return _delta(np.column_stack([v, w]), r, np.array([1.0, -r]) / w.mean())


@dataclass(frozen=True)
class ReverseKL:
    """Reverse-KL estimates from the model's own samples (see `conditional_reverse_kl`)."""

    cond: Estimate | None  # KL(q_A‖p_d), nats/sequence; None when no sample is possible
    cond_per_token: Estimate | None  # KL(q_A‖p_d) / E_{q_A}[tokens]
    impossible: Estimate  # 1 − q(A): fraction of samples with p_d(x) = 0, binomial stderr

    def to_dict(self) -> dict[str, float]:
        out = self.impossible.to_dict("impossible_frac")
        for est, key in ((self.cond, "reverse_kl_cond"), (self.cond_per_token, "reverse_kl_cond_per_token")):
            if est is not None:
                out.update(est.to_dict(key))
        return out


def conditional_reverse_kl(logp_model: np.ndarray, logp_data: np.ndarray,
                           lengths: np.ndarray | None = None) -> ReverseKL:
    """KL(q_A‖p_d) of the model q = p_θ restricted to A = {x: p_d(x) > 0}, and 1 − q(A).

    Samples: x_i ~ q (the model's own samples); log p_d(x) = −inf marks an impossible sample, for
    which the true reverse KL(q‖p_d) is infinite. With s_i = 1[x_i ∈ A] and r_i = log q(x_i) −
    log p_d(x_i) on A (0 off A), column means a = mean(s·r), b = mean(s) = q̂(A):

        KL(q_A‖p_d) = E_q[r | A] − log q(A)  ≈  a/b − log b          (nats/sequence, ≥ 0)

    since q_A(x) = q(x)/q(A) on A. The mean of r over the possible samples alone (a/b) estimates
    KL(q_A‖p_d) + log q(A): negative once the model leaks mass, and falling the more it leaks; it
    is NOT reported. Per token (``lengths`` given, c = mean(s·len)): KL(q_A‖p_d) / E_{q_A}[len] ≈
    (a − b log b)/c. Both are smooth functions of column means: consistent, O(1/n) bias (upward:
    −log is convex), stderr by the delta method. Nothing is clipped.
    """
    logp_model, logp_data = _paired(logp_model, logp_data, "logp_model", "logp_data")
    if logp_model.size == 0:
        raise ValueError("cannot estimate reverse KL from zero samples")
    _require_finite(logp_model, "logp_model")
    if np.any(np.isnan(logp_data)) or np.any(logp_data == np.inf):
        raise ValueError("logp_data must be finite or -inf")
    s = np.isfinite(logp_data).astype(np.float64)  # (n,)
    impossible = mean_estimate(1.0 - s)
    if not s.any():
        return ReverseKL(None, None, impossible)
    sr = np.where(s > 0, logp_model - np.where(s > 0, logp_data, 0.0), 0.0)  # (n,) s·r
    a, b = sr.mean(), s.mean()
    cond = _delta(np.column_stack([sr, s]), a / b - np.log(b), np.array([1.0 / b, -a / b**2 - 1.0 / b]))
    per_tok = None
    if lengths is not None:
        sl = s * _paired(lengths, logp_model, "lengths", "logp_model")[0]  # (n,) s·len
        c = sl.mean()
        f = (a - b * np.log(b)) / c
        per_tok = _delta(np.column_stack([sr, s, sl]), f, np.array([1.0, -(np.log(b) + 1.0), -f]) / c)
    return ReverseKL(cond, per_tok, impossible)


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

    The mean length is treated as a constant (its own sampling error is ignored); prefer
    `ratio_estimate` when the per-sample lengths are at hand.
    """
    if mean_length <= 0:
        raise ValueError(f"mean_length must be positive, got {mean_length}")
    return Estimate(mean=est.mean / mean_length, stderr=est.stderr / mean_length, n=est.n)
