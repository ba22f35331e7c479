"""Confidence intervals of proportions (pair accuracies, win rates) and the warning on a weak judge.

One method everywhere: the Wilson score interval (Wilson, JASA 1927; Brown, Cai & DasGupta,
Statistical Science 2001, who recommend it over the Wald interval p̂ ± z·SE, which collapses to a
point at p̂ ∈ {0, 1} and undercovers at small n). Ties counted as ½ make p̂·n fractional; the
formula takes p̂ and n as they are. Pure Python: the report imports it without numpy or torch.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%
METHOD = "Wilson score, 95%"
# a reward model this weak on held-out pairs is a noisy judge: every RM-scored number inherits it
WEAK_JUDGE = 0.6


def wilson(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of a proportion ``p_hat`` observed over ``n`` trials."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"p_hat={p_hat} is not a proportion in [0, 1]")
    z2 = z * z
    centre = (p_hat + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(p_hat: float, n: int) -> dict:
    """``{"value", "low", "high", "n", "interval"}``: a proportion with its interval, as metrics store it."""
    low, high = wilson(p_hat, n)
    return {"value": float(p_hat), "low": low, "high": high, "n": int(n), "interval": METHOD}


def weak_judge_warning(accuracy: float | None, low: float, high: float, n: int) -> str | None:
    """The warning line for a reward model whose held-out pair accuracy is below ``WEAK_JUDGE``
    (the point estimate: the interval's upper end would stay above 0.6 on any small held-out set,
    e.g. 0.567 on 60 pairs has [0.44, 0.68], and never warn), or None."""
    if accuracy is None or accuracy >= WEAK_JUDGE:
        return None
    chance = "its interval includes chance (0.5)" if low <= 0.5 else "above chance (0.5) but weak"
    return (f"**Warning: the reward model's held-out pair accuracy is {accuracy:.3f} [{low:.3f}, {high:.3f}] "
            f"({METHOD}, {n} pairs), below {WEAK_JUDGE}**: {chance}; every RM-judged number below (RM reward, "
            "win rates (RM), best-of-N picks, the -rw and online methods' training signal) inherits this noise.")
