"""Report section of energy-based decoding: held-out cross-entropy change (the headline), the fit,
decoders on test prompts, and its claims (p* vs p_θ)."""

from __future__ import annotations

from pathlib import Path

from beyondlm.report.claims import Claim, Effect
from beyondlm.report.common import fmt, get, image, read_json
from beyondlm.report.convergence import Verdicts


def _headline(ev: dict) -> list[str]:
    ppl, xent = ev["ppl"], ev.get("xent", {})
    return [f"**Held-out cross-entropy change of p* vs p_θ: {fmt(xent.get('diff_per_token'), '+.4f')} ± "
            f"{fmt(xent.get('diff_per_token_se'), '.4f')} nats/token** (negative = p* better; SE over the "
            f"{ppl.get('n_texts', '?')} test texts). Test perplexity of p_θ {ppl['base']:.3f}, of p* "
            f"{ppl['ebm']:.3f} ± {ppl['ebm_se']:.3f} (Monte Carlo Ẑ per prompt).", ""]


def _decoders(ev: dict) -> list[str]:
    names = ev["names"]
    out = ["Decoders on test prompts: MAUVE against the reference continuations, each feature's gap to the "
           "reference mean (± SE), and the fraction of texts the language cannot produce. `sample_b` is a second "
           "plain-sampling draw: differences smaller than sample vs sample_b are noise.", "",
           "| decoder | MAUVE | " + " | ".join(f"gap {n}" for n in names) + " | impossible | length |",
           "|" + "---|" * (len(names) + 4)]
    for dec, d in ev["decoders"].items():
        gaps = " | ".join(f"{d['gap'][n]:+.3g} ± {d['gap_se'][n]:.2g}" for n in names)
        out.append(f"| {dec} | {d['mauve']:.3f} | {gaps} | {fmt(d.get('impossible_frac'), '.3f')} | "
                   f"{d['metrics']['mean_length']:.1f} |")
    return out + [""]


def ebm_section(metrics: Path, reports: Path) -> list[str]:
    """Headline held-out cross-entropy change, the fitted μ and residuals, decoders, quality vs M."""
    if (fit := read_json(metrics / "ebm.json")) is None:
        return []
    ev = read_json(metrics / "ebm_eval.json")
    kl_in = fit.get("kl_in_sample", fit.get("kl"))
    out = ["## Energy-based decoding (p* ∝ p_θ·exp(−μᵀf))", "", *(_headline(ev) if ev else []),
           f"Fitted on `{fit.get('base', '?')}` (one run); ESS {fit.get('ess_frac', float('nan')):.2f} of the "
           f"proposal samples; solver converged: {fit.get('converged')}; in-sample KL(p*‖p_θ) "
           f"{fmt(kl_in, '.4f')} nats (on the fitting samples: optimistic by about K/2N, not a measured gain).", "",
           "| feature | target F̂ | residual before | residual after | μ |", "|---|---|---|---|---|"]
    for name in fit["names"]:
        out.append(f"| {name} | {fit['targets'][name]:.4g} | {fit['residual_before'][name]:.3g} | "
                   f"{fit['residual_after'][name]:.2g} | {fit['mu'][name]:.4g} |")
    out.append("")
    if ev:
        out += _decoders(ev)
    png = reports / "plots" / "ebm" / "quality_vs_m.png"
    return out + image("quality vs M", png if png.exists() else None, reports)


def claims(metrics: Path, verdicts: Verdicts) -> list[Claim]:
    """p* vs p_θ: held-out cross-entropy (SE over test texts) and MAUVE of SIR at the largest M vs
    plain sampling (one draw each: no SE; the two plain draws' difference shown as the noise)."""
    fit, ev = read_json(metrics / "ebm.json"), read_json(metrics / "ebm_eval.json")
    if fit is None or ev is None:
        return []
    base = fit.get("base", "?")
    failing = tuple(verdicts.failing("sft", [base]) + ([] if fit.get("converged") else ["ebm/solver"]))
    n = int(get(ev, "ppl.n_texts") or 0)
    xent = Effect(get(ev, "xent.diff_per_token"), get(ev, "xent.diff_per_token_se"), n,
                  f"{n} test texts, 1 run (base `{base}`)")
    out = [Claim("p* = p_θ·exp(−μᵀf)/Z lowers held-out cross-entropy (H(p_d,p*) ≤ H(p_d,p_θ))",
                 "p* − p_θ: nats/token on test", xent, -1, failing)]
    dec = ev.get("decoders", {})
    sir = max((k for k in dec if k.startswith("sir_m")), key=lambda k: int(k[5:]), default=None)
    if sir and "sample" in dec:
        noise = abs(dec["sample"]["mauve"] - dec["sample_b"]["mauve"]) if "sample_b" in dec else None
        basis = "1 run, no SE" + (f" (two plain draws differ by {noise:.3f})" if noise is not None else "")
        out.append(Claim("EBM-SIR decoding raises MAUVE over plain sampling", f"{sir} − sample: MAUVE",
                         Effect(dec[sir]["mauve"] - dec["sample"]["mauve"], None, 1, basis), +1, failing))
    return out
