"""Assemble ``reports/report.md`` and its figures from what the stages wrote.

Inputs: ``reports/metrics/{prepare.json, sft/*.json, evaluate/*.json}``, the dvclive training
curves ``reports/live/sft/<run>/plots/metrics/train/loss.tsv`` and ``reports/samples/<run>.jsonl``.
Runs are named ``<variant>-s<seed>``; tables aggregate seeds as mean ± std (n = seeds).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from beyondlm.io import atomic_path, write_text, write_tsv  # noqa: E402

RUN = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")

# (column title, path in the evaluate JSON, format)
EVAL_COLUMNS = [
    ("test PPL", "test.perplexity", ".3f"),
    ("fwd KL (nats/seq)", "exact.forward_kl", ".3f"),
    ("rev KL on possible (nats/seq)", "exact.reverse_kl", ".3f"),
    ("impossible", "exact.impossible_frac", ".3f"),
    ("TVD", "exact.tvd", ".3f"),
    ("distinct-2", "samples.distinct_2", ".3f"),
    ("rep-2", "samples.rep_2", ".3f"),
    ("length", "samples.mean_length", ".1f"),
    ("unfinished", "samples.unfinished_frac", ".3f"),
    ("oracle r*", "samples.oracle_reward", ".2f"),
]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def load_runs(directory: Path) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: metrics}}`` from ``<directory>/<variant>-s<seed>.json``."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(directory.glob("*.json")):
        if m := RUN.match(path.stem):
            runs[m["variant"]][int(m["seed"])] = json.loads(path.read_text())
    return dict(runs)


def mean_std(values: list, fmt: str) -> str:
    if fmt == "s":  # a label: the same for every seed
        return str(next((v for v in values if v is not None), "–"))
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return "–"
    if vals.size == 1:
        return f"{vals[0]:{fmt}}"
    return f"{vals.mean():{fmt}} ± {vals.std(ddof=1):{fmt}}"


SFT_COLUMNS = [
    ("objective", "objective", "s"),
    ("valid PPL", "valid.perplexity", ".3f"),
    ("final train loss", "train.final_loss", ".4f"),
    ("train time (s)", "train.wall_s", ".0f"),
    ("tokens/s", "train.tokens_per_s", ".0f"),
]

BIGRAM_COLUMNS = [
    ("objective", "objective", "s"),
    ("JS to gold rows", "transition.js_mean", ".4f"),
    ("mass on gold zeros", "transition.mass_on_gold_zeros", ".4f"),
    ("first-token JS", "transition.first_token_js", ".4f"),
    ("test NLL/token", "test.nll_per_token", ".4f"),
    ("excess NLL/token", "test.excess_nll_per_token", ".4f"),
    ("fwd KL/seq", "test.forward_kl_per_seq", ".3f"),
]


def metrics_table(runs: dict[str, dict[int, dict]], columns=EVAL_COLUMNS) -> str:
    """One row per variant; numeric cells are mean ± std over its seeds."""
    cols = [c for c in columns if any(_get(m, c[1]) is not None for s in runs.values() for m in s.values())]
    head = "| variant | seeds | " + " | ".join(c[0] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for variant, seeds in runs.items():
        cells = [mean_std([_get(m, path) for m in seeds.values()], fmt) for _, path, fmt in cols]
        lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_row(runs: dict[str, dict[int, dict]]) -> str:
    any_run = next((m for s in runs.values() for m in s.values()), None)
    if any_run is None:
        return ""
    ref, exact = any_run.get("reference", {}), any_run.get("exact", {})
    parts = [f"distinct-2 {ref.get('distinct_2', float('nan')):.3f}", f"rep-2 {ref.get('rep_2', float('nan')):.3f}",
             f"length {ref.get('mean_length', float('nan')):.1f}"]
    if "data_entropy_rate" in exact:
        parts.insert(0, f"entropy-rate floor of test PPL {np.exp(exact['data_entropy_rate']):.3f}")
    return "Reference (the test data itself): " + ", ".join(parts) + "."


def plot_losses(live_root: Path, out: Path) -> Path | None:
    curves = sorted(live_root.glob("*/plots/metrics/train/loss.tsv"))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tsv in curves:
        rows = [ln.split("\t") for ln in tsv.read_text().splitlines()[1:]]
        header = tsv.read_text().splitlines()[0].split("\t")
        s, v = header.index("step"), header.index("loss")
        ax.plot([float(r[s]) for r in rows], [float(r[v]) for r in rows], label=tsv.parents[3].name, lw=1)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="SFT training curves")
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_kl(runs: dict[str, dict[int, dict]], out: Path) -> Path | None:
    """Quality against coverage, mean ± std over seeds per variant: TVD (always defined) and,
    where some samples are possible, reverse KL over them, each against forward KL."""
    panels = [(y, label) for y, label in (("exact.tvd", "TVD(p_θ, p_d)"),
                                          ("exact.reverse_kl", "reverse KL(p_θ‖p_d), possible samples"))
              if any(_get(m, y) is not None for s in runs.values() for m in s.values())]
    if not panels or not any(_get(m, "exact.forward_kl") is not None for s in runs.values() for m in s.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (y, label) in zip(axes[0], panels):
        for variant, seeds in runs.items():
            p = np.array([(_get(m, "exact.forward_kl"), _get(m, y)) for m in seeds.values()
                          if None not in (_get(m, "exact.forward_kl"), _get(m, y))], dtype=float)
            if p.size == 0:
                continue
            err = p.std(0, ddof=1) if len(p) > 1 else np.zeros(2)
            ax.errorbar(p[:, 0].mean(), p[:, 1].mean(), xerr=err[0], yerr=err[1], fmt="o", capsize=3, label=variant)
        ax.set(xlabel="forward KL(p_d‖p_θ), nats/seq (coverage)", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Exact divergences on the synthetic language (lower is better)")
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def plot_quality_vs_m(rows: list[dict], tsv: Path, png: Path, *, chance_mauve: float) -> None:
    """TSV for ``dvc plots`` and a PNG: MAUVE and each |gap| against M (log axis).

    ``chance_mauve``: MAUVE of a second plain-sampling draw, drawn as a line: how far MAUVE moves
    between two draws of the same decoder."""
    write_tsv(tsv, rows)
    cols = list(rows[0])
    Ms = [r["M"] for r in rows]
    gaps = [c for c in cols if c.startswith("gap_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(Ms, [r["mauve"] for r in rows], "o-", label="sampling (M = 1), EBM-SIR")
    axes[0].axhline(chance_mauve, ls="--", c="gray", label="second plain-sampling draw")
    axes[0].legend(fontsize=8)
    axes[0].set(xscale="log", xlabel="M (SIR candidates; 1 = plain sampling)", ylabel="MAUVE")
    for c in gaps:  # relative to M = 1 so features of different units share an axis
        base = abs(rows[0][c]) or 1.0
        axes[1].plot(Ms, [abs(r[c]) / base for r in rows], "o-", label=c[4:])
    axes[1].set(xscale="log", xlabel="M", ylabel="|gap to reference| / |gap at M=1|")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.minorticks_off()  # log axis: label exactly the Ms
        ax.set_xticks(Ms, [str(m) for m in Ms])
    _save(fig, png)



def sample_section(samples_dir: Path, n: int) -> str:
    parts = []
    for path in sorted(samples_dir.glob("*.jsonl")):
        texts = [json.loads(ln)["text"] for ln in path.read_text().splitlines()[:n]]
        parts.append(f"**{path.stem}**\n\n" + "\n".join(f"- {t}" for t in texts))
    return "\n\n".join(parts)


def ebm_section(metrics: Path, reports: Path) -> list[str]:
    """The fitted weights μ, constraint residuals, and decoders compared on test prompts."""
    fit_path, eval_path = metrics / "ebm.json", metrics / "ebm_eval.json"
    if not fit_path.exists():
        return []
    fit = json.loads(fit_path.read_text())
    out = ["## Energy-based decoding (p* ∝ p_θ·exp(−μᵀf))", "",
           f"Fitted on `{fit.get('base', '?')}`; ESS {fit.get('ess_frac', float('nan')):.2f} of the proposal samples; "
           f"converged: {fit.get('converged')}.", "",
           "| feature | target F̂ | residual before | residual after | μ |", "|---|---|---|---|---|"]
    for name in fit["names"]:
        out.append(f"| {name} | {fit['targets'][name]:.4g} | {fit['residual_before'][name]:.3g} | "
                   f"{fit['residual_after'][name]:.2g} | {fit['mu'][name]:.4g} |")
    if not eval_path.exists():
        return out + [""]
    ev = json.loads(eval_path.read_text())
    names = ev["names"]
    out += ["", "Decoders on test prompts: MAUVE against the reference continuations, each feature's gap to "
            "the reference mean (± SE), and the fraction of texts the language cannot produce. "
            "`sample_b` is a second plain-sampling draw: differences smaller than sample vs sample_b are noise.", "",
            "| decoder | MAUVE | " + " | ".join(f"gap {n}" for n in names) + " | impossible | length |",
            "|" + "---|" * (len(names) + 4)]
    for dec, d in ev["decoders"].items():
        gaps = " | ".join(f"{d['gap'][n]:+.3g} ± {d['gap_se'][n]:.2g}" for n in names)
        imp = d.get("impossible_frac")
        out.append(f"| {dec} | {d['mauve']:.3f} | {gaps} | {'–' if imp is None else f'{imp:.3f}'} | "
                   f"{d['metrics']['mean_length']:.1f} |")
    ppl, xent = ev["ppl"], ev.get("xent", {})
    out += ["", f"Test perplexity of p_θ {ppl['base']:.3f}, of p* {ppl['ebm']:.3f} ± {ppl['ebm_se']:.3f} "
            f"(Monte Carlo Ẑ per prompt). Cross-entropy change {xent.get('diff_per_token', float('nan')):+.4f} "
            f"± {xent.get('diff_per_token_se', float('nan')):.4f} nats/token (negative = p* better).", ""]
    png = reports / "plots" / "ebm" / "quality_vs_m.png"
    if png.exists():
        out += [f"![quality vs M]({png.relative_to(reports).as_posix()})", ""]
    return out


ALIGN_COLUMNS = [("KL(π‖π_sft)", "kl", ".2f"), ("oracle r*", "oracle_reward", ".2f"), ("RM reward", "rm_reward", ".2f"),
                 ("win vs SFT (oracle)", "win_vs_sft/oracle", ".3f"), ("win vs chosen (oracle)", "win_vs_chosen/oracle", ".3f"),
                 ("win vs SFT (RM)", "win_vs_sft/rm", ".3f"), ("win vs chosen (RM)", "win_vs_chosen/rm", ".3f"),
                 ("length", "length", ".1f")]


def load_align(metrics: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((metrics / "align" / "method").glob("*.json"))}


def plot_frontier(results: dict[str, dict], bon: dict | None, out: Path) -> Path | None:
    """Oracle reward against KL(π‖π_sft) along training, mean ± std over seeds per method."""
    from beyondlm.align.analysis import frontier

    if not results:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, res in results.items():
        rows = frontier(res)
        if rows and rows[0].get("oracle_reward") is not None:
            ax.errorbar([r["kl"] for r in rows], [r["oracle_reward"] for r in rows],
                        xerr=[r["kl_std"] for r in rows], yerr=[r["oracle_reward_std"] for r in rows],
                        marker="o", ms=3, capsize=2, label=f"{method} (n={len(res['runs'])})")
    if bon and bon["rows"][0].get("oracle_reward") is not None:
        ax.plot([r["kl"] for r in bon["rows"]], [r["oracle_reward"] for r in bon["rows"]], "k--", marker="s", ms=3,
                label="best-of-N (analytic KL)")
    ax.set(xlabel="KL(π_θ‖π_sft), nats/sequence", ylabel="oracle reward r* (held-out prompts)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def align_section(metrics: Path, reports: Path) -> list[str]:
    """Reward model quality, the frontier figure, final metrics per method, EXO vs DPO at equal KL."""
    from beyondlm.align.analysis import compare_at_equal_kl

    results = load_align(metrics)
    if not results:
        return []
    out = ["## Alignment: DPO, EXO, RLOO and best-of-N (oracle reward vs KL)", ""]
    rm_path = metrics / "align" / "reward.json"
    if rm_path.exists():
        rm = json.loads(rm_path.read_text())
        corr = (f"; Pearson {rm['oracle_pearson']:.3f}, Spearman {rm['oracle_spearman']:.3f} with the oracle r* over "
                "all SFT samples" if "oracle_pearson" in rm else "")
        out += [f"Reward model: held-out pair accuracy {rm['valid_accuracy']:.3f} ({rm['n_valid_pairs']} pairs; "
                f"train {rm['train_accuracy']:.3f}){corr}.", ""]
    bon_path = metrics / "align" / "best_of_n.json"
    bon = json.loads(bon_path.read_text()) if bon_path.exists() else None
    png = plot_frontier(results, bon, reports / "plots" / "report" / "align_frontier.png")
    if png is not None:
        out += [f"![reward vs KL]({png.relative_to(reports).as_posix()})", ""]
    out += ["Final checkpoint of each method, mean ± std over seeds, on held-out prompts (one pure sample per "
            "prompt; win rates count ties as ½; 'chosen' = the oracle's pick of two SFT samples).", "",
            "| method | seeds | " + " | ".join(c for c, _, _ in ALIGN_COLUMNS) + " |",
            "|---|---|" + "---|" * len(ALIGN_COLUMNS)]
    first = next(iter(results.values()))
    out.append("| SFT (step 0) | – | " + " | ".join(mean_std([first["sft"].get(k)], f) for _, k, f in ALIGN_COLUMNS)
               + " |")
    for method, res in results.items():
        finals = [run["evals"][-1] for run in res["runs"].values()]
        out.append(f"| {method} | {len(finals)} | " + " | ".join(mean_std([e.get(k) for e in finals], f)
                                                            for _, k, f in ALIGN_COLUMNS) + " |")
    for row in (bon or {}).get("rows", []):
        out.append(f"| best-of-{row['N']} | – | " + " | ".join(mean_std([row.get(k)], f) for _, k, f in ALIGN_COLUMNS)
                   + " |")
    out.append("")
    for exo, dpo in (("exo_pref", "dpo_pref"), ("exo_rw", "dpo_rw")):
        if exo in results and dpo in results:
            rows = compare_at_equal_kl(results[exo], results[dpo])
            if not rows:
                out += [f"{exo} vs {dpo}: their KL ranges do not overlap; no equal-KL comparison.", ""]
                continue
            wins = sum(r["diff"] > 2 * r["diff_se"] for r in rows)
            losses = sum(r["diff"] < -2 * r["diff_se"] for r in rows)
            out += [f"**{exo} vs {dpo} at equal KL** (each seed's frontier interpolated; difference of seed means "
                    f"± SE): {exo} higher by more than 2 SE at {wins} of {len(rows)} KL values, lower at {losses}.", "",
                    "| KL | " + exo + " | " + dpo + " | difference |", "|---|---|---|---|"]
            out += [f"| {r['kl']:.2f} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} ± {r['diff_se']:.2f} |"
                    for r in rows]
            out.append("")
    return out



def _f(x, fmt: str) -> str:
    return "–" if x is None else f"{x:{fmt}}"


def vq_section(metrics: Path) -> list[str]:
    """Latent plan vs the plain SFT baseline: NLL, codebook usage, sample metrics."""
    path = metrics / "vq.json"
    if not path.exists():
        return []
    v = json.loads(path.read_text())
    t, cb, base = v["test"], v["codebook"], v.get("baseline") or {}
    out = ["## Latent plan with discrete codes (VQ)", "",
           f"Discretizer `{v['discretizer']}`, K = {v['n_codes']} codes, one code per {2 ** v['n_down']} tokens. "
           f"Codebook on test: perplexity {cb['perplexity']:.1f}, {cb['dead_codes']} dead codes. "
           f"Test NLL per token: reconstruction with the posterior's codes {t['recon_nll_per_token']:.3f}, "
           f"upper bound with the prior's NLL of those codes {t['nll_bound_per_token']:.3f}"
           + (f"; plain SFT baseline `{base['dir']}` {base['test']['nll_per_token']:.3f}" if base else "")
           + (f"; data entropy rate {t['data_entropy_rate']:.3f}" if t.get("data_entropy_rate") else "") + ".", "",
           "| samples (T = 1) | rep-2 | distinct-2 | tr-32 | length | unfinished | impossible | log p_d / token |",
           "|---|---|---|---|---|---|---|---|"]
    for name, m in (("prior → decoder", v["samples"]), ("SFT baseline", (base or {}).get("samples")),
                    ("reference (test)", v.get("reference"))):
        if m:
            out.append(f"| {name} | {_f(m.get('rep_2'), '.4f')} | {_f(m.get('distinct_2'), '.3f')} | "
                       f"{_f(m.get('tr_32'), '.3f')} | {_f(m.get('mean_length'), '.1f')} | "
                       f"{_f(m.get('unfinished_frac'), '.3f')} | {_f(m.get('impossible_frac'), '.3f')} | "
                       f"{_f(m.get('logp_data_per_token'), '.3f')} |")
    return out + [""]


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
    return _save(fig, out)


def knnlm_section(metrics: Path, reports: Path) -> list[str]:
    """Base LM vs kNN-LM perplexity per split, the index's measured recall, perplexity vs λ."""
    path = metrics / "knnlm.json"
    if not path.exists():
        return []
    k = json.loads(path.read_text())
    idx = k["index"]
    store = json.loads((metrics / "datastore.json").read_text()) if (metrics / "datastore.json").exists() else {}
    recall = next(((name, val) for name, val in idx.items() if name.startswith("recall@")), None)
    out = ["## Look-up model (kNN-LM)", "",
           f"Datastore: {store.get('n_keys', idx.get('n_keys'))} keys"
           + (f" of dimension {store['dim']}, built at {store['keys_per_s'] * 60 / 1e6:.2f} M keys/min" if store else "")
           + f". Index `{idx.get('cfg/kind')}`"
           + (f", {recall[0]} against exact search {recall[1]:.3f}" if recall else "") + ".", "",
           "| split | LM perplexity | best kNN-LM perplexity | k | λ | LM fwd KL(p_d‖p) | kNN-LM fwd KL |",
           "|---|---|---|---|---|---|---|"]
    for split, m in k.items():
        if isinstance(m, dict) and "best" in m:
            b = m["best"]
            out.append(f"| {split} | {_f(m.get('lm_ppl'), '.3f')} | {b['ppl']:.3f} | {b['k']} | {b['lambda']} | "
                       f"{_f(m.get('lm_forward_kl'), '.3f')} | {_f(b.get('forward_kl'), '.3f')} |")
    out.append("")
    png = plot_knnlm(reports / "plots" / "knnlm" / "ppl.tsv", reports / "plots" / "report" / "knnlm.png")
    if png is not None:
        out += [f"![perplexity vs lambda]({png.relative_to(reports).as_posix()})", ""]
    return out



def build_report(reports: Path, n_examples: int) -> str:
    metrics = reports / "metrics"
    plots = reports / "plots" / "report"
    prep = json.loads((metrics / "prepare.json").read_text()) if (metrics / "prepare.json").exists() else {}
    runs = load_runs(metrics / "evaluate")
    out = ["# beyondlm report", ""]
    if prep:
        t = prep.get("train", {})
        out += ["## Data", "", f"Vocabulary {prep.get('vocab_size')} tokens; train {t.get('n_texts')} texts, "
                f"{t.get('n_tokens')} tokens (mean length {t.get('mean_length', 0):.1f}).", ""]
    out += ["## Evaluation", "", "Mean ± std over seeds. KL and TVD are exact-likelihood Monte Carlo estimates "
            "against the known data distribution (nats per sequence); 'impossible' is the fraction of model "
            "samples the language cannot produce: the true reverse KL is then infinite, and the column shows the "
            "estimate over the possible samples only — a conditional quantity that can be negative, since the "
            "model mass outside the support is left out.",
            "", metrics_table(runs) if runs else "_no evaluated runs_", "", reference_row(runs), ""]
    if sft_runs := load_runs(metrics / "sft"):
        out += ["## Training", "", metrics_table(sft_runs, SFT_COLUMNS), ""]
    if bigram_runs := load_runs(metrics / "bigram"):
        floor = next(iter(next(iter(bigram_runs.values())).values())).get("train_counts", {}).get("js_mean")
        out += ["## Random-bigram gold language (MixCE's synthetic setting)", "",
                "Learned next-token rows (probed after [BOS, w]) against the exact gold rows; mean ± std over seeds.",
                "", metrics_table(bigram_runs, BIGRAM_COLUMNS), ""]
        if floor is not None:
            out += [f"Counting bigrams in the same training texts reaches JS {floor:.4f}: the finite-data floor.", ""]
    out += ebm_section(metrics, reports)
    out += align_section(metrics, reports)
    out += vq_section(metrics)
    out += knnlm_section(metrics, reports)
    for title, path in (("Training curves", plot_losses(reports / "live" / "sft", plots / "loss.png")),
                        ("Coverage vs quality", plot_kl(runs, plots / "kl.png"))):
        if path is not None:
            out += [f"## {title}", "", f"![{title}]({path.relative_to(reports).as_posix()})", ""]
    if samples := sample_section(reports / "samples", n_examples):
        out += ["## Samples", "", samples, ""]
    text = "\n".join(out)
    write_text(reports / "report.md", text)
    return text
