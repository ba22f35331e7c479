"""Report section of the look-up model (kNN-LM vs its LM), and its claims."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from beyondlm.report.claims import Claim, Effect
from beyondlm.report.common import fmt, image, read_json, save_fig
from beyondlm.report.convergence import Verdicts


def plot_knnlm(tsv: Path, out: Path) -> Path | None:
    """Perplexity against λ, one line per split and k."""
    if not tsv.exists():
        return None
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line]
    fig, ax = plt.subplots(figsize=(5, 4))
    for split, k in dict.fromkeys((r[0], r[1]) for r in rows):
        pts = sorted((float(r[2]), float(r[3])) for r in rows if (r[0], r[1]) == (split, k))
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{split}, k={k}")
    ax.set(xlabel="λ (weight of p_kNN)", ylabel="perplexity")
    ax.legend(fontsize=7)
    return save_fig(fig, out)


def knnlm_section(metrics: Path, reports: Path) -> list[str]:
    """Base LM vs kNN-LM perplexity per split, the index's measured recall, perplexity vs λ."""
    if (k := read_json(metrics / "knnlm.json")) is None:
        return []
    idx = k["index"]
    store = read_json(metrics / "datastore.json") or {}
    recall = next(((name, val) for name, val in idx.items() if name.startswith("recall@")), None)
    out = ["## Look-up model (kNN-LM)", "",
           f"Datastore: {store.get('n_keys', idx.get('n_keys'))} keys"
           + (f" of dimension {store['dim']}" if store else "")
           + f". Index `{idx.get('cfg/kind')}`"
           + (f", {recall[0]} against exact search {recall[1]:.3f}" if recall else "") + ".", "",
           "| split | LM perplexity | best kNN-LM perplexity | k | λ | LM fwd KL(p_d‖p) | kNN-LM fwd KL |",
           "|---|---|---|---|---|---|---|"]
    for split, m in k.items():
        if isinstance(m, dict) and "best" in m:
            b = m["best"]
            out.append(f"| {split} | {fmt(m.get('lm_ppl'), '.3f')} | {b['ppl']:.3f} | {b['k']} | {b['lambda']} | "
                       f"{fmt(m.get('lm_forward_kl'), '.3f')} | {fmt(b.get('forward_kl'), '.3f')} |")
    out.append("")
    png = plot_knnlm(reports / "plots" / "knnlm" / "ppl.tsv", reports / "plots" / "report" / "knnlm.png")
    return out + image("perplexity vs lambda", png, reports)


def claims(metrics: Path, verdicts: Verdicts, base: str | None) -> list[Claim]:
    """kNN-LM vs its LM on test at the (k, λ) chosen on valid (test's own best where valid is
    missing): perplexity and exact forward KL; one run, no SE."""
    k = read_json(metrics / "knnlm.json")
    test = (k or {}).get("test")
    if not test or "best" not in test:
        return []
    tuned = (k.get("valid") or {}).get("best") or test["best"]
    kk, lam, how = str(tuned["k"]), str(float(tuned["lambda"])), "valid" if k.get("valid") else "test (no valid)"
    failing = tuple(verdicts.failing("sft", [base])) if base else ("sft/<unknown LM>",)
    basis = f"1 run, no SE (k={kk}, λ={lam} tuned on {how})"
    out = []
    for claim, key, lm_key in (("kNN-LM lowers the LM's perplexity", "ppl", "lm_ppl"),
                               ("kNN-LM lowers the exact forward KL(p_d‖p)", "forward_kl", "lm_forward_kl")):
        x, y = ((test.get("k") or {}).get(kk) or {}).get(key, {}).get(lam), test.get(lm_key)  # λ keys hold dots
        effect = Effect(None if None in (x, y) else x - y, None, 1, basis)
        out.append(Claim(claim, f"kNN-LM − LM: test {key}", effect, -1, failing))
    return out
