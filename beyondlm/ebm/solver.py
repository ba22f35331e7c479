"""The dual of the moment-matching I-projection of energy-based decoding (ICLR 2024).

"Energy-based decoding by evaluation functions" (ICLR 2024) targets
    p* = argmin_q KL(q‖p_θ)  s.t.  E_q[f] = F̂          (F̂: the data's means of f)
whose solution is p*(x) = p_θ(x)·exp(−μᵀf(x)) / Z(μ). μ minimises the convex dual
    g(μ) = log E_{p_θ}[exp(−μᵀf)] + μᵀF̂,   ∇g = F̂ − E_{p*}[f],   ∇²g = Cov_{p*}[f].
Estimators, from samples x_i ~ p_θ with features F_i (optionally carrying base importance
weights b_i, e.g. the exact p of an enumerated space):
    Ẑ = Σ_i b̄_i exp(−μᵀF_i)                  (b̄ = b / Σb; 1/N for plain samples)
    E_{p*}[f] ≈ Σ_i w_i F_i,  w_i ∝ b_i exp(−μᵀF_i)   (self-normalised importance weights)
    ESS = (Σw)² / Σw²
    SE(log Ẑ) ≈ sqrt(Σ_i b̄_i² (u_i/Ẑ − 1)²),  u_i = exp(−μᵀF_i)      (delta method)
    KL(p*‖p_θ) ≈ Σ_i w_i log(w_i / b̄_i) = −μᵀE_w[f] − log Ẑ      (``kl_in_sample``)
The last is an IN-SAMPLE estimate: μ is fitted on the same samples, so it is optimistic by about
K/(2N) nats (K features, N samples). The theory's H(p_d,p*) = H(p_d,p_θ) − KL(p*‖p_θ) holds only
when the constraints hold exactly under p_d; whether p* helps is measured on held-out text (the
cross-entropy change in ``ebm_eval``), not read off this number.
Solved by damped Newton with Armijo backtracking on standardised features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linprog
from scipy.special import logsumexp, softmax


@dataclass(frozen=True)
class EBMSolution:
    """μ in the original feature units, with the diagnostics of the importance weights."""

    mu: np.ndarray  # (K,)
    names: tuple[str, ...]
    targets: np.ndarray  # (K,) F̂
    residual_before: np.ndarray  # (K,) F̂ − mean(F) (base-weighted)
    residual_after: np.ndarray  # (K,) F̂ − E_w[F]
    ess: float
    ess_frac: float
    log_z: float
    log_z_se: float
    kl_in_sample: float  # KL(p*‖p_θ) on the fitting samples: optimistic by ~K/2N
    iterations: int
    converged: bool

    def to_dict(self) -> dict:
        per = lambda a: {n: float(v) for n, v in zip(self.names, a)}  # noqa: E731
        return {
            "names": list(self.names), "mu": per(self.mu), "targets": per(self.targets),
            "residual_before": per(self.residual_before),
            "residual_after": per(self.residual_after),
            "ess": self.ess, "ess_frac": self.ess_frac, "log_z": self.log_z,
            "log_z_se": self.log_z_se, "kl_in_sample": self.kl_in_sample, "iterations": self.iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EBMSolution":
        names = tuple(d["names"])
        vec = lambda key: np.array([d[key][n] for n in names], dtype=np.float64)  # noqa: E731
        return cls(mu=vec("mu"), names=names, targets=vec("targets"),
                   residual_before=vec("residual_before"), residual_after=vec("residual_after"),
                   ess=d["ess"], ess_frac=d["ess_frac"], log_z=d["log_z"],
                   log_z_se=d["log_z_se"], kl_in_sample=d.get("kl_in_sample", d.get("kl")),
                   iterations=d["iterations"],
                   converged=d["converged"])


def _check_inputs(F: np.ndarray, t: np.ndarray, names: tuple[str, ...], log_b: np.ndarray | None):
    if F.ndim != 2 or F.shape[1] != len(names) or t.shape != (len(names),):
        raise ValueError(f"features {F.shape}, targets {t.shape} and {len(names)} names disagree")
    if F.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {F.shape[0]}")
    for what, arr in (("features", F), ("targets", t)):
        if not np.all(np.isfinite(arr)):
            bad = sorted({names[k] for k in np.argwhere(~np.isfinite(arr))[:, -1]})
            raise ValueError(f"non-finite {what} for {bad}")
    if log_b is not None and (log_b.shape != (F.shape[0],) or np.any(np.isnan(log_b))
                              or np.any(log_b == np.inf) or not np.any(np.isfinite(log_b))):
        raise ValueError(f"log_weights must be (N,) = ({F.shape[0]},), finite or −inf, "
                         "not all −inf")


def _check_support(F: np.ndarray, t: np.ndarray, names, b: np.ndarray):
    """Base-weighted mean and std; constant, infeasible or collinear features → ValueError."""
    on = b > 0
    lo, hi = F[on].min(0), F[on].max(0)
    for k, name in enumerate(names):
        if lo[k] == hi[k]:
            raise ValueError(f"feature {name!r} is constant over the {int(on.sum())} samples: "
                             "drop it or draw more samples")
        if not lo[k] < t[k] < hi[k]:
            raise ValueError(f"target of feature {name!r} = {t[k]:.6g} lies outside the sampled "
                             f"range ({lo[k]:.6g}, {hi[k]:.6g}): no reweighting of these samples "
                             "can match it (open interval: a boundary target needs μ = ±∞)")
    mean = b @ F
    std = np.sqrt(b @ (F - mean) ** 2)
    Z = (F[on] - mean) / std
    for k in range(1, len(names)):
        if np.linalg.matrix_rank(Z[:, : k + 1], tol=1e-9 * np.sqrt(len(Z))) <= k:
            raise ValueError(f"feature {names[k]!r} is a linear function of {list(names[:k])} "
                             "over the samples: drop one")
    return mean, std


def _check_hull(Z: np.ndarray, tz: np.ndarray, t: np.ndarray, names) -> None:
    """Targets jointly outside the convex hull of the samples → ValueError (an LP on λ ≥ 0).

    Run only when Newton did not converge: each feature's range may hold its target while no
    convex combination of the sampled vectors hits all of them at once (then μ diverges).
    """
    A = np.vstack([Z.T, np.ones(len(Z))])  # (K+1, N): Σλ_i Z_i = t, Σλ_i = 1
    res = linprog(np.zeros(len(Z)), A_eq=A, b_eq=np.append(tz, 1.0), bounds=(0, None),
                  method="highs")
    if res.status == 2:  # infeasible
        wanted = {n: float(v) for n, v in zip(names, t)}
        raise ValueError(f"targets {wanted} lie outside the convex hull of the {len(Z)} sampled "
                         "feature vectors (each range alone holds its target): no reweighting "
                         "matches them jointly; drop a feature or draw more samples")


def _dual(nu: np.ndarray, Z: np.ndarray, t: np.ndarray, log_b: np.ndarray):
    """g(ν) = log Σ b̄ exp(−νᵀZ) + νᵀt, its gradient t − E_w[Z] and Hessian Cov_w[Z]."""
    a = log_b - Z @ nu  # (N,)
    w = softmax(a)
    ez = w @ Z  # (K,)
    cov = (Z * w[:, None]).T @ Z - np.outer(ez, ez)  # (K, K)
    return logsumexp(a) + nu @ t, t - ez, cov


def _newton(Z, t, log_b, *, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """Damped Newton on the standardised dual; stops at max |∇g| < tol (residual / std)."""
    nu = np.zeros(Z.shape[1])
    g, grad, H = _dual(nu, Z, t, log_b)
    for it in range(max_iter + 1):
        if np.max(np.abs(grad)) < tol:
            return nu, it, True
        if it == max_iter:
            break
        # small ridge: Cov_w degenerates when the weights collapse onto a few samples
        step = -np.linalg.solve(H + 1e-10 * np.eye(len(nu)) * max(1.0, np.trace(H)), grad)
        alpha, slope = 1.0, grad @ step  # slope < 0: Newton direction on a convex g
        while alpha > 1e-12:
            g_new, grad_new, H_new = _dual(nu + alpha * step, Z, t, log_b)
            if np.isfinite(g_new) and g_new <= g + 1e-4 * alpha * slope:
                break
            alpha *= 0.5
        else:
            return nu, it, False  # no decrease left at machine precision
        nu, g, grad, H = nu + alpha * step, g_new, grad_new, H_new
    return nu, max_iter, False


def _diagnostics(F: np.ndarray, mu: np.ndarray, log_bbar: np.ndarray) -> dict:
    bbar = np.exp(log_bbar)
    a = log_bbar - F @ mu  # (N,) log(b̄ u)
    log_z = float(logsumexp(a))
    w = np.exp(a - log_z)
    ratio = np.where(bbar > 0, np.exp(-F @ mu - log_z), 0.0)  # u_i / Ẑ
    nz = w > 0
    return {
        "ew": w @ F, "ess": float(1.0 / np.sum(w**2)), "log_z": log_z,
        "log_z_se": float(np.sqrt(np.sum(bbar**2 * (ratio - 1.0) ** 2))),
        "kl_in_sample": float(np.sum(w[nz] * (a[nz] - log_z - log_bbar[nz]))),
    }


def solve_dual(
    features: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    *,
    log_weights: np.ndarray | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> EBMSolution:
    """μ such that the reweighted samples match ``targets``: E_w[f] = F̂ (see module docstring).

    features (N, K), targets (K,). ``log_weights`` (N,): optional base log-weights b_i (the
    samples' importance weights w.r.t. p_θ; None for samples drawn from p_θ itself).
    """
    names = tuple(names)
    F = np.asarray(features, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    log_b = None if log_weights is None else np.asarray(log_weights, dtype=np.float64)
    _check_inputs(F, t, names, log_b)
    log_b = np.zeros(len(F)) if log_b is None else log_b
    log_bbar = log_b - logsumexp(log_b)  # (N,) normalised base weights
    mean, std = _check_support(F, t, names, np.exp(log_bbar))
    on = np.isfinite(log_bbar)
    Z, tz = (F[on] - mean) / std, (t - mean) / std  # standardised: conditioning of the Hessian
    nu, iters, converged = _newton(Z, tz, log_bbar[on], tol=tol, max_iter=max_iter)
    if not converged:
        _check_hull(Z, tz, t, names)  # raises if no μ exists; else on/near the hull's boundary
    mu = nu / std  # νᵀ(F − m)/s = (ν/s)ᵀF − const; the constant cancels in p*
    d = _diagnostics(F[on], mu, log_bbar[on])
    return EBMSolution(
        mu=mu, names=names, targets=t, residual_before=t - mean, residual_after=t - d["ew"],
        ess=d["ess"], ess_frac=d["ess"] / len(F), log_z=d["log_z"], log_z_se=d["log_z_se"],
        kl_in_sample=d["kl_in_sample"], iterations=iters, converged=converged,
    )


def log_p_star(logp_model: np.ndarray, features: np.ndarray, sol: EBMSolution) -> np.ndarray:
    """log p*(x) = log p_θ(x) − μᵀf(x) − log Ẑ, (N,) float64 (normaliser estimated by Ẑ)."""
    F = np.asarray(features, dtype=np.float64)
    if F.ndim != 2 or F.shape[1] != len(sol.mu):
        raise ValueError(f"features {F.shape} do not match {len(sol.mu)} evaluation functions")
    return np.asarray(logp_model, dtype=np.float64) - F @ sol.mu - sol.log_z
