"""The claims table: each method's claim, our measured effect ± SE, and a verdict.

Verdict rule (`verdict`): with the effect measured as (method − baseline) and the claim's sign,
- supports: effect in the claimed direction and |effect| ≥ 2 SE;
- contradicts: effect in the opposite direction and |effect| ≥ 2 SE;
- inconclusive, with every reason that applies: a run involved did not converge, the comparison
  cannot test the claim (``Claim.blocked``: e.g. a latent plan whose codebook collapsed), fewer than 3
  independent units behind the SE (seeds; or one run without an SE of its own), no data or no SE,
  |effect| < 2 SE.
SE over seeds (`seed_effect`): paired by seed when both arms ran the same seeds (std/√n of the
per-seed differences), otherwise Welch (sqrt(s_a²/n_a + s_b²/n_b)). A single run whose metric
carries its own SE over samples (test texts, prompts) uses that SE, and the table says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beyondlm.report.common import get, load_runs
from beyondlm.report.convergence import Verdicts


def verdict(effect: float | None, se: float | None, *, claimed_sign: int, n: int, converged: bool,
            blocked: tuple[str, ...] = ()) -> str:
    """supports / contradicts / "inconclusive: <reasons>" (module docstring); ``n``: independent
    units behind ``se`` (seeds, or samples when the SE is over samples); ``blocked``: reasons the
    comparison cannot test the claim at all (e.g. "codebook collapsed"), each one inconclusive."""
    reasons = ([] if converged else ["not converged"]) + list(blocked)
    if effect is None or not math.isfinite(effect):
        return "inconclusive: " + "; ".join(reasons + ["no data"])
    if n < 3:
        reasons.append(f"{n} run" + ("" if n == 1 else "s"))
    if se is None or not math.isfinite(se):
        reasons.append("no SE")
    elif not abs(effect) >= 2 * se or effect == 0:
        reasons.append("effect within 2 SE")
    if reasons:
        return "inconclusive: " + "; ".join(reasons)
    return "supports" if np.sign(effect) == np.sign(claimed_sign) else "contradicts"


@dataclass(frozen=True)
class Effect:
    """A measured difference (method − baseline) with its SE and what the SE is over."""

    value: float | None
    se: float | None
    n: int  # independent units behind the SE
    basis: str

    def __str__(self) -> str:
        if self.value is None or not math.isfinite(self.value):
            return "–"
        se = "" if self.se is None or not math.isfinite(self.se) else f" ± {self.se:.2g}"
        return f"{self.value:+.4g}{se}"


def seed_effect(a: dict, b: dict) -> Effect:
    """Mean of a − b over seeds (``{seed: value}``, None values dropped): paired when both have the
    same seeds (≥ 2), else Welch; SE nan when an arm has a single seed."""
    a = {s: v for s, v in a.items() if v is not None}
    b = {s: v for s, v in b.items() if v is not None}
    if not a or not b:
        return Effect(None, None, min(len(a), len(b)), "no data")
    if a.keys() == b.keys() and len(a) >= 2:
        d = np.array([a[s] - b[s] for s in sorted(a)], dtype=float)
        return Effect(float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), len(d), f"paired over {len(d)} seeds")
    return welch(np.array(list(a.values()), float), np.array(list(b.values()), float))


def welch(va: np.ndarray, vb: np.ndarray, *, var_a: float | None = None, var_b: float | None = None,
          basis: str = "") -> Effect:
    """mean(va) − mean(vb), SE sqrt(s_a²/n_a + s_b²/n_b). An arm may bring its own variance of its
    mean (``var_a``/``var_b``: one run with an SE over prompts, e.g. best-of-N); an arm of one value
    without it makes the SE nan. ``n``: the fewest seeds among the arms without their own variance."""
    arms = ((np.asarray(va, float), var_a), (np.asarray(vb, float), var_b))
    var = sum(v.var(ddof=1) / len(v) if own is None and len(v) > 1 else (np.nan if own is None else own)
              for v, own in arms)
    n = min((len(v) for v, own in arms if own is None), default=1)
    return Effect(float(arms[0][0].mean() - arms[1][0].mean()), float(np.sqrt(var)), n,
                  basis or f"Welch over {len(va)} + {len(vb)} seeds")


@dataclass(frozen=True)
class Claim:
    claim: str  # the paper's claim, one line
    comparison: str  # what is measured, "method − baseline: metric"
    effect: Effect
    claimed_sign: int  # the sign of (method − baseline) the claim predicts
    failing: tuple[str, ...] = ()  # involved runs that did not converge
    blocked: tuple[str, ...] = ()  # why the comparison cannot test the claim (verdict: inconclusive)

    @property
    def verdict(self) -> str:
        return verdict(self.effect.value, self.effect.se, claimed_sign=self.claimed_sign, n=self.effect.n,
                       converged=not self.failing, blocked=self.blocked)


# ----------------------------------------------------------------------------- SFT objectives
# objective family → (the paper's claim, metric path in the metrics JSON, claimed sign of method − MLE)
SFT_CLAIMS = {
    "tailr": [("TaiLr (TVD) improves quality: lower TVD(p_θ, p_d)", "exact.tvd", -1),
              ("TaiLr is mode-seeking: lower conditional reverse KL(q_A‖p_d)", "exact.reverse_kl_cond", -1),
              ("TaiLr writes fewer impossible texts (at the data's lengths)", "exact.impossible_frac_at_data_length", -1),
              ("TaiLr keeps coverage: forward KL(p_d‖p_θ) not above MLE's", "exact.forward_kl", -1)],
    "mixce": [("MixCE improves quality on the review language: lower TVD", "exact.tvd", -1),
              ("MixCE lowers the conditional reverse KL(q_A‖p_d)", "exact.reverse_kl_cond", -1)],
    "emo": [("EMO improves quality: lower TVD(p_θ, p_d)", "exact.tvd", -1),
            ("EMO improves the LM: lower forward KL(p_d‖p_θ)", "exact.forward_kl", -1)],
}
BIGRAM_CLAIMS = {
    "mixce": [("MixCE learns gold transitions better (bigram LM): lower mean JS", "transition.js_mean", -1),
              ("MixCE puts less mass on gold zeros (bigram LM)", "transition.mass_on_gold_zeros", -1)],
}


def _family(variant: str, seeds: dict[int, dict]) -> str:
    return next((m["objective"] for m in seeds.values() if m.get("objective")), variant.split("-")[0])


def variant_claims(runs: dict[str, dict[int, dict]], families: dict[str, str], table: dict, *,
                   stage: str, verdicts: Verdicts, baseline: str = "mle") -> list[Claim]:
    """One row per (non-baseline variant, claim of its family), effect over seeds vs ``baseline``."""
    if baseline not in runs:
        return []
    out = []
    for variant, seeds in runs.items():
        for claim, key, sign in table.get(families.get(variant, variant.split("-")[0]), []):
            effect = seed_effect({s: get(m, key) for s, m in seeds.items()},
                                 {s: get(m, key) for s, m in runs[baseline].items()})
            involved = [f"{v}-s{s}" for v in (variant, baseline) for s in runs[v]]
            out.append(Claim(claim, f"{variant} − {baseline}: `{key}`", effect, sign,
                             tuple(verdicts.failing(stage, involved))))
    return out


def sft_claims(metrics: Path, verdicts: Verdicts) -> list[Claim]:
    """TaiLr, MixCE, EMO vs MLE on the review language (evaluate metrics), and MixCE vs MLE on the
    random bigram language (bigram metrics)."""
    sft = load_runs(metrics / "sft")
    families = {v: _family(v, s) for v, s in sft.items()}
    bigram = load_runs(metrics / "bigram")
    return (variant_claims(load_runs(metrics / "evaluate"), families, SFT_CLAIMS, stage="sft", verdicts=verdicts)
            + variant_claims(bigram, {v: _family(v, s) for v, s in bigram.items()}, BIGRAM_CLAIMS,
                             stage="bigram", verdicts=verdicts))


# ----------------------------------------------------------------------------- rendering
def rows(claims: list[Claim]) -> list[str]:
    out = ["| claim (paper) | measured: method − baseline | effect ± SE | SE over | verdict |",
           "|---|---|---|---|---|"]
    for c in claims:
        basis = c.effect.basis + (f"; not converged: {', '.join(c.failing)}" if c.failing else "")
        out.append(f"| {c.claim} | {c.comparison} | {c.effect} | {basis} | **{c.verdict}** |")
    return out


RULE = ("Verdict: *supports* when the effect has the claimed sign and |effect| ≥ 2 SE, *contradicts* when "
        "it has the opposite sign and |effect| ≥ 2 SE, otherwise *inconclusive* with the reason (effect within "
        "2 SE; fewer than 3 seeds, or one run without an SE of its own; a run involved did not converge). "
        "SE over seeds: paired by seed when both arms ran the same seeds, else Welch.")


def section(claims: list[Claim]) -> list[str]:
    if not claims:
        return []
    return ["## Claims", "", RULE, "", *rows(claims), ""]


def summary(claims: list[Claim]) -> str:
    """A block the README can paste: the verdict counts, the rule and the table."""
    counts = {k: sum(c.verdict.startswith(k) for c in claims) for k in ("supports", "contradicts", "inconclusive")}
    head = ", ".join(f"{v} {k}" for k, v in counts.items())
    return "\n".join([f"**Claims: {head}** (of {len(claims)}; `reports/report.md` § Claims).", "", RULE, "",
                      *rows(claims), ""])
