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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

TOL = 0.01
WINDOW = 0.25


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

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(curve: Sequence[tuple[int, float]], *, tol: float = TOL, window: float = WINDOW) -> Verdict:
    """The verdict on a held-out curve ``[(step, loss), ...]`` (lower is better; any order)."""
    points = sorted((int(s), float(v)) for s, v in curve)
    if not points:
        return Verdict(False, None, tol, window, None, None, None, 0)
    best_step, best = min(points, key=lambda p: (p[1], p[0]))
    cut = (1.0 - window) * points[-1][0]
    before = [v for s, v in points if s <= cut]
    after = [v for s, v in points if s > cut]
    if not before or not after:
        return Verdict(False, None, tol, window, best_step, best, points[-1][1], len(points))
    l_cut = min(before)
    rel = (l_cut - best) / max(points[0][1] - best, 1e-12)  # 0 when the run never improved
    return Verdict(rel < tol, rel, tol, window, best_step, best, points[-1][1], len(points))


def all_converged(verdicts: Iterable[dict | Verdict]) -> bool:
    """True iff every verdict (dict or :class:`Verdict`) says converged."""
    flags = [v.converged if isinstance(v, Verdict) else bool(v.get("converged")) for v in verdicts]
    return bool(flags) and all(flags)
