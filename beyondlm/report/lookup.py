"""The look-up section: LM vs kNN-LM (fixed λ, learned λ, adaptive retrieval) vs GRF, and GRF's claim.

kNN-LM numbers come from ``knnlm.json`` (one run; every test token after BOS), GRF's from
``grf/s<seed>.json`` (one file per seed; only the tokens after each text's prompt, the LM it
started from scored on the same tokens), so each family is compared with its own LM row.
"""

from __future__ import annotations

from pathlib import Path

from beyondlm.report import knnlm
from beyondlm.report.claims import Claim, seed_effect
from beyondlm.report.common import fmt, get, load_json_dir, mean_std, read_json
from beyondlm.report.convergence import Verdicts


def grf_runs(metrics: Path) -> dict[int, dict]:
    """{seed: metrics} of ``grf/s<seed>.json``."""
    return {int(name[1:]): m for name, m in load_json_dir(metrics / "grf").items()
            if name.startswith("s") and name[1:].isdigit()}


def mean_se(values: list, spec: str = ".3f") -> str:
    """``mean ± SE`` (SE = std/√n over seeds) of the non-None values; one value alone; – for none."""
    return mean_std(values, spec, se=True)


def knn_rows(k: dict | None, prep: dict | None) -> list[str]:
    """Summary rows of the kNN-LM family on all test tokens (forward KL per token = the stage's
    per-sequence value × texts / tokens, when the whole test split was scored)."""
    test = (k or {}).get("test") or {}
    if "best" not in test:
        return []
    g = k.get("gate") or {}
    ppl, lam = g.get("test_ppl") or {}, g.get("mean_lambda") or {}
    n_texts, n_tok = get(prep, "test.n_texts"), test.get("n_tokens")
    per_tok = (lambda v: None if v is None or not n_texts or not n_tok else v * n_texts / n_tok)  # noqa: E731
    rows = [("LM", ppl.get("lm", test.get("lm_ppl")), per_tok(test.get("lm_forward_kl")), None),
            (f"kNN-LM, fixed λ={g.get('fixed_lambda', test['best']['lambda'])}", ppl.get("fixed", test["best"]["ppl"]),
             per_tok(test["best"].get("forward_kl")), None)]
    rows += [(f"kNN-LM, {name} λ", ppl.get(name), None, lam.get(name)) for name in ("learned", "adaptive") if name in ppl]
    return [f"| {label} | all test tokens | {fmt(p, '.3f')} | {fmt(kl, '.4f')} | – | "
            f"{fmt((m or {}).get('all'), '.3f')} | {fmt((m or {}).get('content'), '.3f')} | "
            f"{fmt((m or {}).get('function'), '.3f')} |" for label, p, kl, m in rows]


def grf_rows(runs: dict[int, dict]) -> list[str]:
    """GRF and the LM it started from (and, when it was fine-tuned, that LM alone), mean ± SE."""
    if not runs:
        return []
    ms = list(runs.values())
    col = lambda key: [get(m, key) for m in ms]  # noqa: E731
    tuned = any(get(m, "test.lm_finetuned") != get(m, "test.lm") for m in ms)
    rows = [("LM (start of GRF)", "test.lm", "test.lm/forward_kl_per_token", "samples.lm", None)]
    if tuned:
        rows.append(("GRF's fine-tuned LM, gate 0", "test.lm_finetuned", None, None, None))
    rows.append(("GRF", "test.grf", "test.grf/forward_kl_per_token", "samples.grf", "gate"))
    out = []
    for label, ppl, kl, samples, gate in rows:
        imp = col(f"{samples}.impossible_frac_at_data_length") if samples else [None]
        g = [mean_se(col(f"gate.{x}")) for x in ("mean", "content", "function")] if gate else ["–"] * 3
        out.append(f"| {label} | after the prompt | {mean_se(col(ppl))} | {mean_se(col(kl), '.4f') if kl else '–'} | "
                   f"{mean_se(imp)} | " + " | ".join(g) + " |")
    return out


def grf_text(runs: dict[int, dict]) -> list[str]:
    """Setting, subgraph sizes, convergence and speed of the GRF runs."""
    if not runs:
        return []
    m0 = next(iter(runs.values()))
    sub = m0.get("subgraph") or {}
    ok = sum(bool(m.get("converged")) for m in runs.values())
    return ["", f"GRF ({len(runs)} seed(s); {ok} converged): the prompt is the first {m0.get('prompt_len')} tokens; "
            f"its concepts ({sub.get('grounded', 0):.1f} a prompt on average) are expanded to "
            f"{sub.get('nodes', 0):.0f} nodes and {sub.get('edges', 0):.0f} forward edges; scored on "
            f"{get(m0, 'test.n_tokens')} continuation tokens of {m0.get('n_test')} test texts. Impossible rate: "
            f"one completion per test prompt, standardised to the data's lengths. Gate mean by target word "
            f"class ({get(m0, 'gate.groups_by') or '?'}); y_t is a concept P_c can produce at "
            f"{mean_se([get(m, 'gate.in_graph_frac') for m in runs.values()])} of the positions. Per-token decoding "
            "cost against the plain LM: `reports/bench/lookup.json`."]


def lookup_section(metrics: Path, reports: Path) -> list[str]:
    """One section: the summary table of every look-up model, then the kNN-LM details."""
    k, runs = read_json(metrics / "knnlm.json"), grf_runs(metrics)
    if k is None and not runs:
        return []
    out = ["## Look-up models (kNN-LM, GRF)", "",
           "Each family is compared with its own LM row: kNN-LM on every test token, GRF on the tokens after "
           "each text's prompt (it looks up the prompt's concepts). Forward KL(p_d‖p) per token over whole test "
           "texts (exact p_d). GRF rows: mean ± SE over seeds.", "",
           "| model | tokens | test perplexity | fwd KL/token | impossible (at data lengths) | mean gate/λ | "
           "content words | function words |", "|---|---|---|---|---|---|---|---|",
           *knn_rows(k, read_json(metrics / "prepare.json")), *grf_rows(runs), *grf_text(runs), ""]
    body = knnlm.knnlm_section(metrics, reports)
    return out + [("#" + line if line.startswith("## ") else line) for line in body]


def claims(metrics: Path, verdicts: Verdicts, base: str | None) -> list[Claim]:
    """GRF lowers the perplexity of the LM it starts from (paired by seed)."""
    runs = grf_runs(metrics)
    if not runs:
        return []
    effect = seed_effect({s: get(m, "test.grf") for s, m in runs.items()},
                         {s: get(m, "test.lm") for s, m in runs.items()})
    failing = verdicts.failing("grf", [f"s{s}" for s in sorted(runs)]) + (verdicts.failing("sft", [base]) if base else [])
    return [Claim("GRF (graph look-up) lowers the LM's perplexity", "GRF − its start LM: test perplexity after the prompt",
                  effect, -1, tuple(failing))]
