"""Report sections of the SFT family: exact divergences, samples and lengths, training, bigram.

Inputs: ``metrics/{sft,evaluate,bigram}/<variant>-s<seed>.json``, the dvclive curves
``live/sft/<run>/plots/metrics/train/loss.tsv`` and ``samples/<run>.jsonl``. Tables aggregate
seeds as mean ± std (n = seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from beyondlm.report.common import get, image, load_runs, mean_std, readable, save_fig
from beyondlm.report.convergence import Verdicts

# (column title, path in the evaluate JSON, format)
EXACT_COLUMNS = [
    ("test PPL", "test.perplexity", ".3f"),
    ("fwd KL (nats/seq)", "exact.forward_kl", ".3f"),
    ("fwd KL/token", "exact.forward_kl_per_token", ".4f"),
    ("cond. rev KL(q_A‖p_d) (nats/seq)", "exact.reverse_kl_cond", ".3f"),
    ("cond. rev KL/token", "exact.reverse_kl_cond_per_token", ".4f"),
    ("impossible", "exact.impossible_frac", ".3f"),
    ("impossible at data lengths", "exact.impossible_frac_at_data_length", ".3f"),
    ("TVD", "exact.tvd", ".3f"),
]
SAMPLE_COLUMNS = [
    ("length", "length.samples_mean", ".1f"),
    ("length TVD to data", "length.tvd", ".3f"),
    ("log p_d/token (possible)", "samples.logp_data_per_token", ".3f"),
    ("oracle r* (per seq)", "samples.oracle_reward", ".2f"),
    ("distinct-2", "samples.distinct_2", ".3f"),
    ("rep-2", "samples.rep_2", ".3f"),
    ("unfinished", "samples.unfinished_frac", ".3f"),
]
EVAL_COLUMNS = EXACT_COLUMNS + SAMPLE_COLUMNS
SFT_COLUMNS = [
    ("objective", "objective", "s"),
    ("valid PPL", "valid.perplexity", ".3f"),
    ("final train loss", "train.final_loss", ".4f"),
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


def _has(runs: dict[str, dict[int, dict]], path: str) -> bool:
    return any(get(m, path) is not None for s in runs.values() for m in s.values())


def metrics_table(runs: dict[str, dict[int, dict]], columns=EVAL_COLUMNS, *, verdicts: Verdicts | None = None,
                  stage: str = "sft") -> str:
    """One row per variant; numeric cells are mean ± std over its seeds; with ``verdicts``, a
    column "converged" = seeds whose ``stage`` run converged / seeds."""
    cols = [c for c in columns if _has(runs, c[1])]
    conv = verdicts is not None
    head = "| variant | seeds | " + ("converged | " if conv else "") + " | ".join(c[0] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2 + conv)]
    for variant, seeds in runs.items():
        cells = [mean_std([get(m, path) for m in seeds.values()], f) for _, path, f in cols]
        if conv:
            bad = verdicts.failing(stage, [f"{variant}-s{s}" for s in seeds])
            cells.insert(0, f"{len(seeds) - len(bad)}/{len(seeds)}")
        lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_row(runs: dict[str, dict[int, dict]]) -> str:
    any_run = next((m for s in runs.values() for m in s.values()), None)
    if any_run is None:
        return ""
    ref, exact = any_run.get("reference", {}), any_run.get("exact", {})
    parts = [f"distinct-2 {ref.get('distinct_2', float('nan')):.3f}", f"rep-2 {ref.get('rep_2', float('nan')):.3f}",
             f"length {get(any_run, 'length.data_mean') or ref.get('mean_length', float('nan')):.1f}"]
    if "data_entropy_rate" in exact:
        parts.insert(0, f"entropy-rate floor of test PPL {np.exp(exact['data_entropy_rate']):.3f}")
    return "Reference (the test data itself): " + ", ".join(parts) + "."


def _tsv_curve(tsv: Path) -> tuple[list[float], list[float]]:
    lines = tsv.read_text().splitlines()
    header, rows = lines[0].split("\t"), [ln.split("\t") for ln in lines[1:]]
    s, v = header.index("step"), header.index("loss")
    return [float(r[s]) for r in rows], [float(r[v]) for r in rows]


def plot_losses(live_root: Path, out: Path) -> Path | None:
    """Each SFT run's training loss (line) and held-out loss (dots, same colour): a held-out curve
    that turns up is over-fitting, and the kept checkpoint is its lowest point."""
    curves = [p for p in sorted(live_root.glob("*/plots/metrics/train/loss.tsv")) if readable(p)]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tsv in curves:
        (line,) = ax.plot(*_tsv_curve(tsv), label=tsv.parents[3].name, lw=1)
        if readable(valid := tsv.parents[1] / "valid" / "loss.tsv"):
            ax.plot(*_tsv_curve(valid), ls="none", marker="o", ms=3, color=line.get_color())
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)",
           title="SFT training curves (lines: train; dots: held-out)")
    ax.legend(fontsize=7)
    return save_fig(fig, out)


def plot_kl(runs: dict[str, dict[int, dict]], out: Path) -> Path | None:
    """Quality against coverage, mean ± std over seeds per variant: TVD (always defined) and the
    conditional reverse KL(q_A‖p_d), each against forward KL."""
    panels = [(y, label) for y, label in (("exact.tvd", "TVD(p_θ, p_d)"),
                                          ("exact.reverse_kl_cond", "conditional reverse KL(q_A‖p_d), nats/seq"))
              if _has(runs, y)]
    if not panels or not _has(runs, "exact.forward_kl"):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (y, label) in zip(axes[0], panels):
        for variant, seeds in runs.items():
            p = np.array([(get(m, "exact.forward_kl"), get(m, y)) for m in seeds.values()
                          if None not in (get(m, "exact.forward_kl"), get(m, y))], dtype=float)
            if p.size == 0:
                continue
            err = p.std(0, ddof=1) if len(p) > 1 else np.zeros(2)
            ax.errorbar(p[:, 0].mean(), p[:, 1].mean(), xerr=err[0], yerr=err[1], fmt="o", capsize=3, label=variant)
        ax.set(xlabel="forward KL(p_d‖p_θ), nats/seq (coverage)", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Exact divergences on the synthetic language (lower is better)")
    return save_fig(fig, out)


def plot_lengths(runs: dict[str, dict[int, dict]], out: Path) -> Path | None:
    """Length distributions: each variant's samples (seeds pooled) against the test data."""
    hists = {v: [m["length"]["hist"] for m in s.values() if get(m, "length.hist")] for v, s in runs.items()}
    hists = {v: h for v, h in hists.items() if h}
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    data = next(iter(hists.values()))[0]
    d = np.asarray(data["data"], float)
    ax.bar(data["length"], d / d.sum(), width=1.0, color="0.85", label=f"test data (mean {np.average(data['length'], weights=d):.1f})")
    for variant, hs in hists.items():
        top = max(max(h["length"]) for h in hs)
        counts = np.zeros(top)
        for h in hs:
            counts[np.asarray(h["length"]) - 1] += h["samples"]
        lengths = np.arange(1, top + 1)
        ax.step(lengths, counts / counts.sum(), where="mid", lw=1.2,
                label=f"{variant} (mean {np.average(lengths, weights=counts):.1f}, {len(hs)} seeds)")
    ax.set(xlabel="tokens per text (EOS included)", ylabel="share of texts", title="Sample vs data lengths")
    ax.legend(fontsize=7)
    return save_fig(fig, out)


def length_table(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Per variant: mean sample length, length TVD to the data and the TVD two draws of the data's
    own length distribution of the same sizes reach (mean, 95th percentile): the noise level."""
    if not _has(runs, "length.tvd"):
        return []
    out = ["| variant | sample length | data length | length TVD | noise: mean (95%) | beyond noise |",
           "|---|---|---|---|---|---|"]
    for variant, seeds in runs.items():
        ms = [m["length"] for m in seeds.values() if "length" in m]
        if not ms:
            continue
        beyond = sum(m["tvd"] > m["tvd_noise_q95"] for m in ms)
        out.append(f"| {variant} | {mean_std([m['samples_mean'] for m in ms], '.1f')} | {ms[0]['data_mean']:.1f} | "
                   f"{mean_std([m['tvd'] for m in ms], '.3f')} | {np.mean([m['tvd_noise'] for m in ms]):.3f} "
                   f"({np.mean([m['tvd_noise_q95'] for m in ms]):.3f}) | {beyond}/{len(ms)} seeds |")
    return out


EXACT_NOTE = ("KL and TVD are exact-likelihood Monte Carlo estimates against the known data distribution. "
              "'impossible' = 1 − q(A), the share of model samples the language cannot produce (the plain reverse KL "
              "is then infinite); the conditional reverse KL(q_A‖p_d) is that of the model restricted to the possible "
              "texts, = mean over possible samples of (log q − log p_d) − log q(A): never negative. Per-token columns "
              "are ratio estimators (Σ nats / Σ tokens). 'impossible at data lengths' reweights the impossible rate by "
              "length bin to the data's length distribution, so shorter texts cannot look better.")
NO_EXACT = ("Exact KL, TVD and impossible rates: n/a: no known data distribution (real text). Perplexity and the "
            "text metrics below are what this data allows.")


def evaluation_section(runs: dict[str, dict[int, dict]], verdicts: Verdicts, reports: Path) -> list[str]:
    """Exact divergences when p_d is known (the synthetic language), else a line saying they are n/a;
    sample metrics and lengths either way."""
    exact = _has(runs, "exact.forward_kl")
    out = ["## Evaluation", "", f"Mean ± std over seeds. {EXACT_NOTE if exact else NO_EXACT} 'converged': seeds "
           "whose SFT run converged.", ""]
    if not runs:
        return out + ["_no evaluated runs_", ""]
    out += [metrics_table(runs, EXACT_COLUMNS, verdicts=verdicts), "", "Samples (pure ancestral, T = 1):", "",
            metrics_table(runs, SAMPLE_COLUMNS), "", reference_row(runs), ""]
    if lengths := length_table(runs):
        out += ["### Lengths", "",
                "A length TVD within the noise level is what equal length distributions look like at these "
                "sample sizes (seeded bootstrap of the data's lengths).", "", *lengths, ""]
        out += image("length histograms", plot_lengths(runs, reports / "plots" / "report" / "lengths.png"), reports)
    return out


def training_section(metrics: Path) -> list[str]:
    if not (sft_runs := load_runs(metrics / "sft")):
        return []
    return ["## Training", "", metrics_table(sft_runs, SFT_COLUMNS), ""]


def bigram_section(metrics: Path, verdicts: Verdicts) -> list[str]:
    if not (runs := load_runs(metrics / "bigram")):
        return []
    floor = get(next(iter(next(iter(runs.values())).values())), "train_counts.js_mean")
    out = ["## Random-bigram gold language (MixCE's synthetic setting)", "",
           "Learned next-token rows (probed after [BOS, w]) against the exact gold rows; mean ± std over seeds.",
           "", metrics_table(runs, BIGRAM_COLUMNS, verdicts=verdicts, stage="bigram"), ""]
    if floor is not None:
        out += [f"Counting bigrams in the same training texts reaches JS {floor:.4f}: the finite-data floor.", ""]
    return out


def sample_section(samples_dir: Path, n: int) -> str:
    parts = []
    for path in filter(readable, sorted(samples_dir.glob("*.jsonl"))):
        texts = [json.loads(ln)["text"] for ln in path.read_text().splitlines()[:n]]
        parts.append(f"**{path.stem}**\n\n" + "\n".join(f"- {t}" for t in texts))
    return "\n\n".join(parts)
