"""Convergence verdicts of every trained run, read from the stages' metrics files.

Contract (``beyondlm.convergence``): a per-training dict ``convergence`` = {converged,
rel_improvement, tol, window, best_step, best_valid_loss, final_valid_loss, n_evals, gain, noise} at
- ``sft/<variant>-s<seed>.json`` and ``bigram/<variant>-s<seed>.json``: top level;
- ``align/reward.json`` (where dvc.yaml writes it; ``reward.json`` also read): top level;
- ``align/method/<method>.json``: ``runs.s<seed>.convergence``;
- ``vq.json``: ``convergence.posterior`` and ``convergence.prior``;
- ``grf/s<seed>.json``: top level.
A missing dict (a file written before verdicts existed) counts as not converged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beyondlm.report.common import fmt, load_runs, read_json

NOT_CONVERGED = "inconclusive: not converged"


@dataclass(frozen=True)
class RunVerdict:
    stage: str
    run: str
    verdict: dict | None  # the contract's dict; None = no verdict recorded

    @property
    def never_improved(self) -> bool:
        """Its best held-out value is the one before training (step 0), so the kept checkpoint is
        its start: the rule's ratio is 0 there, yet nothing was learned that generalises (e.g. a
        DPO held-out loss rising from log 2 at the first step: lr too high)."""
        v = self.verdict or {}
        return v.get("best_step") == 0 and (v.get("n_evals") or 0) > 1

    @property
    def converged(self) -> bool:
        return bool(self.verdict and self.verdict.get("converged")) and not self.never_improved


def _matrix(metrics: Path, stage: str) -> list[RunVerdict]:
    return [RunVerdict(stage, f"{variant}-s{seed}", m.get("convergence"))
            for variant, seeds in load_runs(metrics / stage).items() for seed, m in sorted(seeds.items())]


def collect(metrics: Path) -> list[RunVerdict]:
    """Every run's verdict, in pipeline order (sft, bigram, reward, align, vq)."""
    out = _matrix(metrics, "sft") + _matrix(metrics, "bigram")
    rm = read_json(metrics / "align" / "reward.json") or read_json(metrics / "reward.json")
    if rm is not None:
        out.append(RunVerdict("reward", "reward", rm.get("convergence")))
    for path in sorted((metrics / "align" / "method").glob("*.json")):
        res = read_json(path) or {}
        out += [RunVerdict("align", f"{path.stem}-{seed}", run.get("convergence"))
                for seed, run in res.get("runs", {}).items()]
    for path in sorted((metrics / "grf").glob("s*.json")):  # grf/s<seed>.json: top level
        out.append(RunVerdict("grf", path.stem, (read_json(path) or {}).get("convergence")))
    if (vq := read_json(metrics / "vq.json")) is not None:
        conv = vq.get("convergence") or {}
        out += [RunVerdict("vq", part, conv.get(part)) for part in ("posterior", "prior")]
    return out


class Verdicts:
    """Look-up of run verdicts: ``ok(stage, runs)`` and which of them did not converge."""

    def __init__(self, rows: list[RunVerdict]):
        self._by = {(r.stage, r.run): r for r in rows}

    def failing(self, stage: str, runs: list[str]) -> list[str]:
        """``stage/run`` names among ``runs`` without a true verdict (missing runs included)."""
        return [f"{stage}/{run}" for run in runs
                if not (r := self._by.get((stage, run))) or not r.converged]


def table(rows: list[RunVerdict]) -> list[str]:
    """Markdown lines: one row per run with its verdict, relative improvement and best step."""
    if not rows:
        return []
    out = ["| stage | run | converged | share of improvement in the last quarter | last-quarter gain / 2 SE noise "
           "| best step | best / final held-out loss |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.verdict or {}
        conv = ("yes" if r.converged else "no: never improved (best at step 0)" if r.never_improved
                else "no" if r.verdict else "no (no verdict recorded)")
        losses = f"{fmt(v.get('best_valid_loss'), '.4f')} / {fmt(v.get('final_valid_loss'), '.4f')}"
        noise = f"{fmt(v.get('gain'), '.4f')} / {fmt(v.get('noise'), '.4f')}"
        out.append(f"| {r.stage} | {r.run} | {conv} | {fmt(v.get('rel_improvement'), '.2%')} | {noise} | "
                   f"{fmt(v.get('best_step'), 'd')} | {losses} |")
    return out


def section(rows: list[RunVerdict]) -> list[str]:
    if not rows:
        return []
    n_ok = sum(r.converged for r in rows)
    return ["## Convergence", "",
            f"A run has converged when the last quarter of training brought less than its tolerance (1% by "
            f"default) of the held-out improvement the whole run made, (L_cut − L_best)/(L_0 − L_best) "
            f"(`beyondlm/convergence.py`), or when that last-quarter gain is within twice its paired standard "
            f"error over the held-out chunks (the noise column; – where the evaluation has no chunks); the best "
            f"checkpoint by held-out loss is kept. A run whose best held-out value is the one at step 0 never "
            f"improved (its kept checkpoint is its start) and does not count as converged. "
            f"{n_ok} of {len(rows)} runs converged. Any comparison built on a run that did not converge reads "
            f"\"{NOT_CONVERGED}\" instead of a verdict.", "", *table(rows), ""]
