"""Is a training run done? A verdict from its held-out curve, and the best point on it.

A run has *converged* when the last ``window`` of training brought less than ``tol`` of the
held-out improvement the whole run made: with ``L_0`` the held-out loss at the first evaluation
(step 0), ``L_cut`` the best seen at or before step ``(1 − window)·last_step`` and ``L_best`` the
best over the whole run,

    rel_improvement = (L_cut − L_best) / (L_0 − L_best),    converged ⇔ rel_improvement < tol.

Relative to the improvement, not to the loss value: the objectives' scales differ (MixCE's and
TaiLr's weighted losses move within a few hundredths of a nat, DPO's starts at log 2, RLOO's
objective can be negative), and a loss that barely moves must not pass for a converged one. For
an MLE run the two readings nearly agree (L_0 − L_best ≈ L_best at a uniform start).

A loss that rises in the last window (over-fitting) counts as converged: the best checkpoint is
kept, and it lies before the window. A curve with no evaluation on both sides of the cut cannot
say anything and is not converged.

Evaluation noise. A held-out set of a few hundred preference pairs measures its loss to a few
hundredths, while 1% of a DPO run's improvement is a thousandth or two: the rule above would then
judge the noise, not the run. When the evaluations report their per-chunk sums (a
:class:`HeldOutValue`: the same chunks of the same held-out set at every evaluation), the gain
``L_cut − L_best`` is also compared with its paired standard error (chunk-level ratio estimator of
the difference between the two evaluations), and a gain within ``z`` = 2 standard errors is no
evidence that training was still improving:

    converged ⇔ rel_improvement < tol  or  L_cut − L_best ≤ z · SE(L_cut − L_best).

Both numbers are in the verdict (``gain``, ``noise`` = z·SE), so a reader sees which clause held.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

TOL = 0.01
WINDOW = 0.25
Z = 2.0


class HeldOutValue(NamedTuple):
    """One held-out evaluation: the mean loss Σ sums / Σ units and its per-chunk parts (the same
    chunks, in the same order, at every evaluation of a run)."""

    value: float
    sums: tuple[float, ...]
    units: tuple[float, ...]

    @classmethod
    def from_chunks(cls, sums: Sequence[float], units: Sequence[float]) -> "HeldOutValue":
        return cls(sum(sums) / max(sum(units), 1e-12), tuple(map(float, sums)), tuple(map(float, units)))


def paired_se(a: HeldOutValue, b: HeldOutValue) -> float:
    """Standard error of ``a.value − b.value`` over the same chunks (ratio estimator with the chunk
    as sampling unit: Var ≈ k/(k−1) Σ_c (d_c − Δ·n_c)² / (Σ n)², d_c the chunk's sum difference).
    NaN with fewer than two chunks or chunks that differ between the two evaluations."""
    if len(a.sums) < 2 or a.units != b.units:
        return math.nan
    total = sum(a.units)
    diff = a.value - b.value
    resid = [(sa - sb) - diff * n for sa, sb, n in zip(a.sums, b.sums, a.units)]
    k = len(resid)
    return math.sqrt(k / (k - 1) * sum(r * r for r in resid)) / total


@dataclass(frozen=True)
class Verdict:
    converged: bool
    rel_improvement: float | None
    tol: float
    window: float
    best_step: int | None
    best_valid_loss: float | None
    final_valid_loss: float | None
    n_evals: int
    gain: float | None = None  # L_cut − L_best
    noise: float | None = None  # z · paired SE of the gain (None without per-chunk evaluations)

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(curve: Sequence[tuple[int, float]], *, tol: float = TOL, window: float = WINDOW,
            chunks: Mapping[int, HeldOutValue] | None = None, z: float = Z) -> Verdict:
    """The verdict on a held-out curve ``[(step, loss), ...]`` (lower is better; any order);
    ``chunks`` (step → its :class:`HeldOutValue`) adds the noise clause."""
    points = sorted((int(s), float(v)) for s, v in curve)
    if not points:
        return Verdict(False, None, tol, window, None, None, None, 0)
    best_step, best = min(points, key=lambda p: (p[1], p[0]))
    cut = (1.0 - window) * points[-1][0]
    before = [p for p in points if p[0] <= cut]
    if not before or len(before) == len(points):
        return Verdict(False, None, tol, window, best_step, best, points[-1][1], len(points))
    cut_step, l_cut = min(before, key=lambda p: (p[1], p[0]))
    rel = (l_cut - best) / max(points[0][1] - best, 1e-12)  # 0 when the run never improved
    gain, noise = l_cut - best, None
    if chunks and cut_step in chunks and best_step in chunks:
        se = paired_se(chunks[cut_step], chunks[best_step])
        noise = None if math.isnan(se) else z * se
    converged = rel < tol or (noise is not None and gain <= noise)
    return Verdict(converged, rel, tol, window, best_step, best, points[-1][1], len(points), gain, noise)


def all_converged(verdicts: Iterable[dict | Verdict]) -> bool:
    """True iff every verdict (dict or :class:`Verdict`) says converged."""
    flags = [v.converged if isinstance(v, Verdict) else bool(v.get("converged")) for v in verdicts]
    return bool(flags) and all(flags)
