"""Length distributions of samples vs data: a confounder of every per-sequence quality metric.

Shorter samples are less often impossible and have a higher log p_d, so a model that stops early
can look better per sequence (METHODS.md, "Length is a confounder"). Lengths are token counts
including EOS (an unfinished sample counts its tokens up to the cap).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from beyondlm.metrics.distributional import Estimate


def length_histogram(lengths: Sequence[int], max_len: int) -> np.ndarray:
    """Counts of lengths 0..max_len, (max_len + 1,) int; a longer length raises ValueError."""
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > max_len):
        raise ValueError(f"lengths must lie in [0, {max_len}], got [{arr.min()}, {arr.max()}]")
    return np.bincount(arr, minlength=max_len + 1)


def tvd_of_counts(a: np.ndarray, b: np.ndarray) -> float:
    """½ Σ_l |â_l − b̂_l| between the two normalised histograms (plug-in TVD of two samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def tvd_noise(data_lengths: Sequence[int], n_a: int, n_b: int, *, n_boot: int = 200,
              seed: int = 0) -> tuple[float, float]:
    """Finite-sample reference for `tvd_of_counts`: mean and 95th percentile of the TVD between
    two independent draws of sizes n_a and n_b from the data's empirical length distribution.

    Two samples of one distribution still differ; a sample-vs-data length TVD within this range is
    what matching lengths looks like at these sizes. Seeded bootstrap, ``n_boot`` replicates."""
    data = np.asarray(data_lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    top = int(data.max())
    tvds = [tvd_of_counts(np.bincount(rng.choice(data, n_a), minlength=top + 1),
                          np.bincount(rng.choice(data, n_b), minlength=top + 1)) for _ in range(n_boot)]
    return float(np.mean(tvds)), float(np.quantile(tvds, 0.95))


def length_report(sample_lengths: Sequence[int], data_lengths: Sequence[int], *, max_len: int,
                  seed: int = 0) -> dict:
    """Histograms (lengths 1..longest seen), means, the length TVD and its noise reference."""
    hs, hd = length_histogram(sample_lengths, max_len), length_histogram(data_lengths, max_len)
    top = int(max(np.flatnonzero(hs + hd).max(initial=0), 1))
    noise, noise_q95 = tvd_noise(data_lengths, len(sample_lengths), len(data_lengths), seed=seed)
    return {
        "samples_mean": float(np.mean(sample_lengths)), "data_mean": float(np.mean(data_lengths)),
        "tvd": tvd_of_counts(hs, hd), "tvd_noise": noise, "tvd_noise_q95": noise_q95,
        "hist": {"length": list(range(1, top + 1)), "samples": hs[1 : top + 1].tolist(),
                 "data": hd[1 : top + 1].tolist()},
    }


def impossible_at_data_lengths(sample_lengths: Sequence[int], impossible: Sequence[bool],
                               data_lengths: Sequence[int], *, n_bins: int = 5) -> dict:
    """Impossible rate of the model's samples standardised to the data's length distribution.

    Bins: quantiles of the data lengths (≤ ``n_bins``, equal data mass where ties allow). With
    w_b the data's share and r̂_b the impossible fraction of the n_b model samples in bin b,
        rate = Σ_b w_b r̂_b / Σ_b w_b     over the bins holding ≥ 1 model sample,
    stderr = sqrt(Σ_b w_b² r̂_b(1 − r̂_b)/n_b) / Σ_b w_b (bins independent, binomial). It answers
    "how often would the model write impossible text if its texts were as long as the data's";
    ``coverage`` = Σ_b w_b over the bins used (1 when the model writes every data length range).
    """
    sl, bad = np.asarray(sample_lengths, np.float64), np.asarray(impossible, bool)
    dl = np.asarray(data_lengths, np.float64)
    edges = np.unique(np.quantile(dl, np.linspace(0, 1, n_bins + 1)))
    inner = edges[1:-1]  # bin b = lengths in (edge_b, edge_{b+1}]; the ends are open
    db, sb = np.searchsorted(inner, dl, side="left"), np.searchsorted(inner, sl, side="left")
    k = len(inner) + 1
    w = np.bincount(db, minlength=k) / len(dl)
    n = np.bincount(sb, minlength=k)
    r = np.bincount(sb, weights=bad.astype(float), minlength=k) / np.maximum(n, 1)
    used = n > 0
    cover = float(w[used].sum())
    if cover == 0:
        return {"impossible_frac_at_data_length": None, "impossible_frac_at_data_length_coverage": 0.0}
    var = ((w**2 * r * (1 - r))[used] / n[used]).sum()
    est = Estimate(mean=float((w * r)[used].sum() / cover), stderr=float(np.sqrt(var) / cover), n=int(len(sl)))
    return {**est.to_dict("impossible_frac_at_data_length"), "impossible_frac_at_data_length_coverage": cover}
