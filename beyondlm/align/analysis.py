"""Reading the alignment results: reward–KL frontiers over seeds and comparisons at equal KL.

A run's evaluations are points (KL(π_θ‖π_sft), oracle reward) along training. Methods reach
different KLs, so "does EXO beat DPO" is asked at equal KL: each seed's frontier is linearly
interpolated (points sorted by KL) on a grid inside the KL range every seed of both methods
covers, and the difference of the seed means is reported with its standard error (seeds of the
two methods are independent runs).
"""

from __future__ import annotations

import numpy as np


def seed_points(result: dict, y: str = "oracle_reward") -> list[np.ndarray]:
    """Per seed, its evaluations as an (n, 2) array of (kl, y) sorted by kl."""
    out = []
    for run in result["runs"].values():
        p = np.array([(e["kl"], e[y]) for e in run["evals"] if e.get("kl") is not None and e.get(y) is not None],
                     dtype=float)
        out.append(p[np.argsort(p[:, 0])] if len(p) else np.zeros((0, 2)))
    return out


def frontier(result: dict, y: str = "oracle_reward") -> list[dict]:
    """Per evaluation step: mean and std over seeds of KL and ``y`` (steps every seed has)."""
    runs = list(result["runs"].values())
    steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in runs)))
    rows = []
    for step in steps:
        at = [next(e for e in r["evals"] if e["step"] == step) for r in runs]
        kl = np.array([e.get("kl", np.nan) for e in at], dtype=float)
        val = np.array([e.get(y, np.nan) for e in at], dtype=float)
        sd = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)
        rows.append({"step": step, "kl": float(kl.mean()), "kl_std": sd(kl), y: float(val.mean()), f"{y}_std": sd(val)})
    return rows


def compare_at_equal_kl(a: dict, b: dict, n_grid: int = 4, y: str = "oracle_reward") -> list[dict]:
    """Rows (kl, mean_a, mean_b, diff = a − b, diff_se) on ``n_grid`` KL values spanning the range
    every seed of both results covers; [] when the ranges do not overlap."""
    curves = [seed_points(a, y), seed_points(b, y)]
    pts = [p for c in curves for p in c]
    if not pts or any(len(p) < 2 for p in pts):
        return []
    lo, hi = max(p[0, 0] for p in pts), min(p[-1, 0] for p in pts)
    if not hi > lo:
        return []
    rows = []
    for kl in np.linspace(lo, hi, n_grid + 2)[1:-1]:  # interior points
        va, vb = (np.array([np.interp(kl, p[:, 0], p[:, 1]) for p in c]) for c in curves)
        se = np.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb)) if min(len(va), len(vb)) > 1 else np.nan
        rows.append({"kl": float(kl), "a": float(va.mean()), "b": float(vb.mean()),
                     "diff": float(va.mean() - vb.mean()), "diff_se": float(se)})
    return rows
