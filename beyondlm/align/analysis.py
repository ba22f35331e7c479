"""Reading the alignment results: reward–KL frontiers over seeds and comparisons at equal KL.

A run's evaluations are points (KL(π_θ‖π_sft), oracle reward) along training. Methods reach
different KLs, so "does EXO beat DPO" is asked at equal KL: each seed's frontier is linearly
interpolated (points sorted by KL) on a grid inside the KL range every seed of both methods
covers, and the difference of the seed means is reported with its standard error (seeds of the
two methods are independent runs).

Both axes are per sequence, so a method whose samples are longer gains both reward and KL (r* is a
sequence log-odds: evidence adds up token by token). ``per_token=True`` divides each evaluation's
mean r* and mean KL by its mean sample length (ratio estimators), so the same comparison can be
read length-normalised.

A seed whose final KL runs far beyond its siblings' (``diverged_seeds``) is shown but excluded from
means and comparisons (``without``), and the report lists it: one runaway seed must not set the
mean, nor the error bars that squash every other method into a corner of the frontier.
"""

from __future__ import annotations

import numpy as np


def seed_points(result: dict, y: str = "oracle_reward", per_token: bool = False) -> list[np.ndarray]:
    """Per seed, its evaluations as an (n, 2) array of (kl, y) sorted by kl; ``per_token``: both
    divided by the evaluation's mean sample length (evaluations without one are left out)."""
    out = []
    for run in result["runs"].values():
        evals = [e for e in run["evals"] if e.get("kl") is not None and e.get(y) is not None
                 and (not per_token or (e.get("length") or 0) > 0)]
        p = np.array([(e["kl"], e[y]) for e in evals], dtype=float).reshape(-1, 2)
        if per_token:
            p = p / np.array([e["length"] for e in evals], dtype=float)[:, None]
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


def diverged_seeds(result: dict, *, factor: float = 10.0, floor: float = 0.1) -> list[str]:
    """Seeds whose final KL is non-finite or above ``factor`` × the median final KL of the other
    seeds (that median floored at ``floor`` nats, so near-zero siblings do not flag every seed).
    A rule on the other seeds only: the runaway cannot raise its own threshold. Needs ≥ 2 seeds."""
    final = {name: float(run["evals"][-1].get("kl", np.nan)) for name, run in result["runs"].items()
             if run.get("evals")}  # a run without evaluations has nothing to flag
    if len(final) < 2:
        return []
    out = []
    for name, kl in final.items():
        others = [v for n, v in final.items() if n != name and np.isfinite(v)]
        if not np.isfinite(kl) or (others and kl > factor * max(float(np.median(others)), floor)):
            out.append(name)
    return out


def without(result: dict, seeds: list[str]) -> dict:
    """A copy of ``result`` without the runs named in ``seeds``."""
    return {**result, "runs": {n: r for n, r in result["runs"].items() if n not in seeds}}


def _equal_kl_grid(curves: list[list[np.ndarray]], n_grid: int) -> np.ndarray | None:
    """``n_grid`` interior KL values of the range every curve covers; None if they do not overlap."""
    pts = [p for c in curves for p in c]
    if not pts or any(len(p) < 2 for p in pts):
        return None
    lo, hi = max(p[0, 0] for p in pts), min(p[-1, 0] for p in pts)
    return np.linspace(lo, hi, n_grid + 2)[1:-1] if hi > lo else None


def seed_means_at_equal_kl(a: dict, b: dict, n_grid: int = 4, y: str = "oracle_reward",
                           per_token: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(per seed of ``a``, per seed of ``b``, the KL grid): each seed's interpolated ``y`` averaged
    over the grid of the KL range every seed of both reaches (one number per seed: the frontier's
    mean height there); None when the ranges do not overlap. ``per_token``: as in ``seed_points``."""
    curves = [seed_points(a, y, per_token), seed_points(b, y, per_token)]
    grid = _equal_kl_grid(curves, n_grid)
    if grid is None:
        return None
    va, vb = (np.array([np.interp(grid, p[:, 0], p[:, 1]).mean() for p in c]) for c in curves)
    return va, vb, grid


def compare_at_equal_kl(a: dict, b: dict, n_grid: int = 4, y: str = "oracle_reward") -> list[dict]:
    """Rows (kl, mean_a, mean_b, diff = a − b, diff_se) on ``n_grid`` KL values spanning the range
    every seed of both results covers; [] when the ranges do not overlap."""
    curves = [seed_points(a, y), seed_points(b, y)]
    grid = _equal_kl_grid(curves, n_grid)
    rows = []
    for kl in [] if grid is None else grid:
        va, vb = (np.array([np.interp(kl, p[:, 0], p[:, 1]) for p in c]) for c in curves)
        se = np.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb)) if min(len(va), len(vb)) > 1 else np.nan
        rows.append({"kl": float(kl), "a": float(va.mean()), "b": float(vb.mean()),
                     "diff": float(va.mean() - vb.mean()), "diff_se": float(se)})
    return rows
