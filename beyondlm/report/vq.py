"""Report section of the latent plan (discrete codes) vs the plain SFT baseline, and its claims."""

from __future__ import annotations

from pathlib import Path

from beyondlm.report.claims import Claim, Effect
from beyondlm.report.common import fmt, get, read_json
from beyondlm.report.convergence import Verdicts


# A plan needs codes that differ: below 2 effective codes on test (the codebook's perplexity) the
# decoder sees nearly the same code everywhere, and "prior → decoder" is an LM trained with the
# plan model's budget, not a plan.
COLLAPSED_BELOW = 2.0


def collapsed(v: dict) -> bool:
    """Whether the latent plan of ``vq.json`` collapsed: test codebook perplexity < COLLAPSED_BELOW."""
    return get(v, "codebook.perplexity") is not None and v["codebook"]["perplexity"] < COLLAPSED_BELOW


def vq_section(metrics: Path) -> list[str]:
    """Latent plan vs the plain SFT baseline: NLL, codebook usage, sample metrics."""
    if (v := read_json(metrics / "vq.json")) is None or "test" not in v:
        return []
    t, cb, base = v["test"], v["codebook"], v.get("baseline") or {}
    out = ["## Latent plan with discrete codes (VQ)", "",
           f"Discretizer `{v['discretizer']}`, K = {v['n_codes']} codes, one code per {2 ** v['n_down']} tokens. "
           f"Codebook on test: perplexity {cb['perplexity']:.1f}, {cb['dead_codes']} dead codes. "
           f"Test NLL per token: reconstruction with the posterior's codes {t['recon_nll_per_token']:.3f}, "
           f"upper bound with the prior's NLL of those codes {t['nll_bound_per_token']:.3f}"
           + (f"; plain SFT baseline `{base['dir']}` {base['test']['nll_per_token']:.3f}" if base else "")
           + (f"; data entropy rate {t['data_entropy_rate']:.3f}" if t.get("data_entropy_rate") else "") + ".", "",
           *([f"**Codebook collapsed**: test perplexity {cb['perplexity']:.2f} (< {COLLAPSED_BELOW:g} effective codes): "
              "the decoder sees nearly the same code everywhere, so the plan carries no information and the "
              "'prior → decoder' row is an LM trained with the plan model's budget, not a plan. The latent-plan "
              "claims read inconclusive.", ""] if collapsed(v) else []),
           "| samples (T = 1) | rep-2 | distinct-2 | tr-32 | length | unfinished | impossible | log p_d / token |",
           "|---|---|---|---|---|---|---|---|"]
    for name, m in (("prior → decoder", v["samples"]), ("SFT baseline", base.get("samples")),
                    ("reference (test)", v.get("reference"))):
        if m:
            out.append(f"| {name} | {fmt(m.get('rep_2'), '.4f')} | {fmt(m.get('distinct_2'), '.3f')} | "
                       f"{fmt(m.get('tr_32'), '.3f')} | {fmt(m.get('mean_length'), '.1f')} | "
                       f"{fmt(m.get('unfinished_frac'), '.3f')} | {fmt(m.get('impossible_frac'), '.3f')} | "
                       f"{fmt(m.get('logp_data_per_token'), '.3f')} |")
    return out + [""]


def claims(metrics: Path, verdicts: Verdicts) -> list[Claim]:
    """Latent plan vs its SFT baseline: NLL bound and sample quality (one run each, no SE)."""
    v = read_json(metrics / "vq.json")
    if v is None or not v.get("baseline"):
        return []
    base = Path(v["baseline"]["dir"]).name
    failing = tuple(verdicts.failing("vq", ["posterior", "prior"]) + verdicts.failing("sft", [base]))
    blocked = ("codebook collapsed",) if collapsed(v) else ()

    def diff(a: str, b: str) -> Effect:
        x, y = get(v, a), get(v["baseline"], b)
        return Effect(None if None in (x, y) else x - y, None, 1, f"1 run, no SE (baseline `{base}`)")

    return [Claim("A latent plan lowers the LM's NLL (here its upper bound)", "plan − LM: test NLL/token",
                  diff("test.nll_bound_per_token", "test.nll_per_token"), -1, failing, blocked),
            Claim("A latent plan improves sample quality: higher log p_d per token", "plan − LM: log p_d/token",
                  diff("samples.logp_data_per_token", "samples.logp_data_per_token"), +1, failing, blocked),
            Claim("A latent plan improves sample quality: fewer impossible texts", "plan − LM: impossible",
                  diff("samples.impossible_frac", "samples.impossible_frac"), -1, failing, blocked)]
