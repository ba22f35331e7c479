"""Report section of alignment: reward model, the reward–KL frontier, final metrics, equal-KL
comparisons, and the claims (EXO vs DPO, RLOO and best-of-N against both; IPO, SimPO, KTO,
GRPO, Dr. GRPO and BOND against their baselines when ``align.methods`` holds them).

A seed whose KL ran away (``beyondlm.align.analysis.diverged_seeds``) is drawn apart, listed, and
left out of every mean and comparison. Comparisons involving a run that did not converge (a
method's kept seeds; the reward model for the methods that use it) read "inconclusive: not
converged".

Without an oracle (``oracle.kind: none``, HH preferences) there is no r*: the tables have no r*
columns, the frontier is the reward model's score (labelled RM), and neither equal-KL comparisons
nor claims on r* are made. Proportions carry 95% Wilson intervals (``beyondlm.intervals``): the
reward model's held-out pair accuracy (with a warning below ``WEAK_JUDGE``), win rates over the
evaluation prompts, and the DPO/EXO policies' implicit-reward pair accuracy on held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from beyondlm.intervals import METHOD, proportion, weak_judge_warning, wilson
from beyondlm.align.analysis import compare_at_equal_kl, diverged_seeds, frontier, seed_means_at_equal_kl, without
from beyondlm.report.claims import Claim, Effect, welch
from beyondlm.report.common import image, load_json_dir, mean_std, read_json, save_fig
from beyondlm.report.convergence import NOT_CONVERGED, Verdicts, collect

ALIGN_COLUMNS = [("KL(π‖π_sft)", "kl", ".2f"), ("oracle r*", "oracle_reward", ".2f"), ("RM reward", "rm_reward", ".2f"),
                 ("win vs SFT (oracle)", "win_vs_sft/oracle", ".3f"), ("win vs chosen (oracle)", "win_vs_chosen/oracle", ".3f"),
                 ("win vs SFT (RM)", "win_vs_sft/rm", ".3f"), ("win vs chosen (RM)", "win_vs_chosen/rm", ".3f"),
                 ("length", "length", ".1f")]
# the methods trained on reward-model scores: group and online rows of the loss table (a test keeps them in
# step; the report does not import the table, which would pull torch into its stage) and best-of-N
USES_REWARD_MODEL = ("dpo_rw", "exo_rw", "rloo", "grpo", "dr_grpo", "bond", "best_of_n")
# (method, baseline, the claim): effect = mean oracle reward over the KL range both reach
ALIGN_CLAIMS = [
    ("exo_pref", "dpo_pref", "EXO-pref reaches higher oracle reward than DPO-pref at equal KL"),
    ("exo_rw", "dpo_rw", "EXO-rw reaches higher oracle reward than DPO-rw at equal KL"),
    ("rloo", "dpo_rw", "On-policy RLOO beats offline DPO-rw at equal KL"),
    ("rloo", "exo_rw", "On-policy RLOO beats offline EXO-rw at equal KL"),
    ("best_of_n", "dpo_rw", "Best-of-N's reward–KL frontier lies above DPO-rw's"),
    ("best_of_n", "exo_rw", "Best-of-N's reward–KL frontier lies above EXO-rw's"),
    # the rest of the family, when align.methods holds them (README, `align`: "The whole family on the default")
    ("ipo", "dpo_pref", "IPO's bounded margin reaches higher oracle reward than DPO-pref at equal KL"),
    ("simpo", "dpo_pref", "Reference-free SimPO reaches higher oracle reward than DPO-pref at equal KL"),
    ("kto", "dpo_pref", "KTO from unpaired labels reaches higher oracle reward than DPO-pref at equal KL"),
    ("grpo", "rloo", "GRPO's group-normalised advantages beat RLOO at equal KL"),
    ("dr_grpo", "grpo", "Dr. GRPO's unbiased normalisation beats GRPO at equal KL"),
    ("bond", "best_of_n", "BOND's single sample reaches best-of-N's reward at equal KL"),
]
# the same claims length-normalised (r*/token at equal KL/token): policies whose samples differ in
# length differ in both per-sequence axes (the default's DPO-pref writes 40 tokens, EXO-pref 26, RLOO 36)
PER_TOKEN_CLAIMS = [(a, b, f"{claim}, per token (length-normalised)") for a, b, claim in ALIGN_CLAIMS]


WIN_KEYS = ("win_vs_sft/oracle", "win_vs_chosen/oracle", "win_vs_sft/rm", "win_vs_chosen/rm")
NO_ORACLE = ("No oracle (oracle.kind: none): r* does not exist for these data, so there are no r* columns, the "
             "frontier shows the reward model's score, and no equal-KL comparison or claim on r* is made. Every "
             "reward and win rate here is the reward model's judgement (RM), not ground truth.")


def load_align(metrics: Path) -> dict[str, dict]:
    return load_json_dir(metrics / "align" / "method")


def has_oracle(results: dict[str, dict], bon: dict | None) -> bool:
    """Whether any evaluation (or best-of-N row) was scored by an oracle r*."""
    evals = [e for r in results.values() for run in r.get("runs", {}).values() for e in run.get("evals", [])]
    return any(e.get("oracle_reward") is not None for e in evals + list((bon or {}).get("rows", [])))


def columns(oracle: bool) -> list[tuple[str, str, str]]:
    return [c for c in ALIGN_COLUMNS if oracle or "oracle" not in c[1]]


def split(results: dict[str, dict]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(results without their diverged seeds, {method: diverged seeds})."""
    diverged = {m: diverged_seeds(r) for m, r in results.items()}
    return {m: without(r, diverged[m]) for m, r in results.items()}, {m: d for m, d in diverged.items() if d}


def _kl_scale(ax, kls: list[float]) -> None:
    """Log KL axis; symlog (linear below 0.1 nats) when some KL is ≤ 0 (step 0, Monte Carlo noise)."""
    if min(kls, default=1.0) > 0:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=0.1)


FRONTIER_Y = {"oracle_reward": "oracle reward r* (held-out prompts)",
              "rm_reward": "RM reward (no oracle r*; held-out prompts)"}


def plot_frontier(results: dict[str, dict], bon: dict | None, out: Path, y: str = "oracle_reward") -> Path | None:
    """``y`` (the oracle reward, or the RM's where there is no oracle) against KL(π‖π_sft) along
    training, mean ± std over the kept seeds per method; each diverged seed drawn apart (crosses,
    dotted) and named in the legend."""
    if not results:
        return None
    kept, diverged = split(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    kls = []
    for method, res in kept.items():
        rows = frontier(res, y) if res["runs"] else []
        if rows and np.isfinite(rows[0].get(y, np.nan)):
            kls += [r["kl"] for r in rows]
            line = ax.errorbar([r["kl"] for r in rows], [r[y] for r in rows],
                               xerr=[r["kl_std"] for r in rows], yerr=[r[f"{y}_std"] for r in rows],
                               marker="o", ms=3, capsize=2, label=f"{method} (n={len(res['runs'])})")
            for seed in diverged.get(method, []):
                ev = [e for e in results[method]["runs"][seed]["evals"] if e.get(y) is not None]
                kls += [e["kl"] for e in ev]
                ax.plot([e["kl"] for e in ev], [e[y] for e in ev], ls=":", marker="x",
                        color=line[0].get_color(), label=f"{method} {seed}: diverged, excluded")
    if bon and bon["rows"][0].get(y) is not None:
        kls += [r["kl"] for r in bon["rows"]]
        ax.plot([r["kl"] for r in bon["rows"]], [r[y] for r in bon["rows"]], "k--", marker="s", ms=3,
                label="best-of-N (analytic KL)")
    if not kls:
        plt.close(fig)
        return None
    _kl_scale(ax, kls)
    ax.set(xlabel="KL(π_θ‖π_sft), nats/sequence (log scale)", ylabel=FRONTIER_Y[y])
    ax.legend(fontsize=7)
    return save_fig(fig, out)


def involved(method: str, seeds, verdicts: Verdicts) -> list[str]:
    """Runs of ``method`` (kept seeds) and the reward model where the method uses it, not converged."""
    runs = [] if method == "best_of_n" else verdicts.failing("align", [f"{method}-{s}" for s in seeds])
    return runs + (verdicts.failing("reward", ["reward"]) if method in USES_REWARD_MODEL else [])


def _cell(values: list, key: str, fmt: str, n: int | None) -> str:
    """``mean_std`` of a column; a win rate also gets the Wilson interval of its mean over ``n`` prompts."""
    text = mean_std(values, fmt)
    vals = [v for v in values if v is not None]
    if key in WIN_KEYS and vals and n:
        low, high = wilson(float(np.mean(vals)), n)
        text += f" [{low:.2f}, {high:.2f}]"
    return text


def _implicit(runs: dict) -> str:
    """Implicit-reward pair accuracy of a method's kept seeds: one seed's value and Wilson interval,
    or mean ± std over seeds; "–" for methods without one."""
    acc = [run["implicit_accuracy"] for run in runs.values() if "implicit_accuracy" in run]
    if not acc:
        return "–"
    if len(acc) == 1:
        return f"{acc[0]['value']:.3f} [{acc[0]['low']:.2f}, {acc[0]['high']:.2f}]"
    return mean_std([a["value"] for a in acc], ".3f")


def _final_table(results, kept, diverged, bon, oracle: bool = True) -> list[str]:
    cols = columns(oracle)
    n_eval = next((r["n_eval_prompts"] for r in results.values() if r.get("n_eval_prompts")), None)
    implicit = {m: _implicit(res["runs"]) for m, res in kept.items()}
    pairs = next((run["implicit_accuracy"]["n"] for res in kept.values() for run in res["runs"].values()
                  if "implicit_accuracy" in run), None)
    show_implicit = pairs is not None
    chosen = "the better of two SFT samples by the oracle r*" if oracle else "the better of two SFT samples by the RM"
    prompts = next((r.get("eval_prompts") for r in results.values() if r.get("eval_prompts")), "test")
    where = ("held-out preference pairs' prompts, dialogues up to their last turn," if prompts == "pairs"
             else "held-out prompts (prompts_test)")
    judges = "(RM) = judged by the reward model, (oracle) = by r*" if oracle else "(RM) = judged by the reward model"
    out = [f"Final checkpoint of each method, mean ± std over its kept seeds, on {n_eval or 'the'} {where} (one pure "
           f"sample per prompt; win rates count ties as ½, {judges}; "
           f"'chosen' = {chosen}; [low, high] = {METHOD} interval over the prompts)"
           + (f"; implicit acc. = the fraction of {pairs} held-out pairs where β·log π/π_sft of the saved policy (its "
              "best held-out checkpoint) ranks the chosen completion above the rejected one (ties ½; π = π_sft "
              "gives 0.5)" if show_implicit else "") + ".", "",
           "| method | seeds | " + " | ".join(c for c, _, _ in cols) + (" | implicit acc. (held-out pairs)"
                                                                         if show_implicit else "") + " |",
           "|---|---|" + "---|" * (len(cols) + show_implicit)]
    tail = (lambda text: f" | {text} |" if show_implicit else " |")
    sft = next((r["sft"] for r in results.values() if r.get("sft")), None)
    if sft:
        out.append("| SFT (step 0) | – | " + " | ".join(_cell([sft.get(k)], k, f, n_eval) for _, k, f in cols)
                   + tail("0.500 (ties)"))
    for method, res in kept.items():
        finals = [run["evals"][-1] for run in res["runs"].values() if run.get("evals")]
        n = f"{len(finals)}" + (f" (+{len(diverged[method])} diverged)" if method in diverged else "")
        out.append(f"| {method} | {n} | " + " | ".join(_cell([e.get(k) for e in finals], k, f, n_eval)
                                                        for _, k, f in cols) + tail(implicit[method]))
    for row in (bon or {}).get("rows", []):
        out.append(f"| best-of-{row['N']} | – | " + " | ".join(_cell([row.get(k)], k, f, bon.get("n_prompts"))
                                                               for _, k, f in cols) + tail("–"))
    return out + [""]


def _reward_model_lines(rm: dict | None) -> list[str]:
    """The reward model's held-out pair accuracy with its interval, and the weak-judge warning."""
    if not rm or rm.get("valid_accuracy") is None:
        return []
    iv = rm.get("valid_accuracy_interval") or proportion(rm["valid_accuracy"], rm["n_valid_pairs"])
    corr = (f"; Pearson {rm['oracle_pearson']:.3f}, Spearman {rm['oracle_spearman']:.3f} with the oracle r* over "
            "all SFT samples" if "oracle_pearson" in rm else "")
    out = [f"Reward model: held-out pair accuracy {rm['valid_accuracy']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] "
           f"({METHOD}; {rm['n_valid_pairs']} pairs; train {rm['train_accuracy']:.3f}){corr}.", ""]
    warning = weak_judge_warning(rm["valid_accuracy"], iv["low"], iv["high"], rm["n_valid_pairs"])
    return out + ([warning, ""] if warning else [])


def _equal_kl(a: str, b: str, kept: dict, verdicts: Verdicts) -> list[str]:
    rows = compare_at_equal_kl(kept[a], kept[b])
    if not rows:
        return [f"{a} vs {b}: their KL ranges do not overlap; no equal-KL comparison.", ""]
    failing = list(dict.fromkeys(involved(a, kept[a]["runs"], verdicts) + involved(b, kept[b]["runs"], verdicts)))
    if failing:
        summary = f"{NOT_CONVERGED} ({', '.join(failing)})"
    else:
        wins = sum(r["diff"] > 2 * r["diff_se"] for r in rows)
        losses = sum(r["diff"] < -2 * r["diff_se"] for r in rows)
        summary = f"{a} higher by more than 2 SE at {wins} of {len(rows)} KL values, lower at {losses}"
    return [f"**{a} vs {b} at equal KL** (each seed's frontier interpolated; difference of seed means ± SE): "
            f"{summary}.", "", "| KL | " + a + " | " + b + " | difference |", "|---|---|---|---|",
            *(f"| {r['kl']:.2f} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} ± {r['diff_se']:.2f} |" for r in rows),
            ""]


def align_section(metrics: Path, reports: Path, verdicts: Verdicts | None = None) -> list[str]:
    """Reward model quality, the frontier figure, final metrics per method, EXO vs DPO at equal KL."""
    if not (results := load_align(metrics)):
        return []
    verdicts = verdicts or Verdicts(collect(metrics))
    kept, diverged = split(results)
    bon = read_json(metrics / "align" / "best_of_n.json")
    oracle = has_oracle(results, bon)
    judge = "oracle reward" if oracle else "RM reward; no oracle"
    out = [f"## Alignment: {', '.join(results)} and best-of-N ({judge} vs KL)", ""]
    if not oracle:
        out += [NO_ORACLE, ""]
    out += _reward_model_lines(read_json(metrics / "align" / "reward.json"))
    if diverged:
        listed = "; ".join(f"{m}: {', '.join(s)}" for m, s in diverged.items())
        out += [f"**Diverged seeds** (final KL above 10× the median of the method's other seeds), drawn apart and "
                f"excluded from means and comparisons: {listed}.", ""]
    y = "oracle_reward" if oracle else "rm_reward"
    out += image(f"{'oracle' if oracle else 'RM'} reward vs KL",
                 plot_frontier(results, bon, reports / "plots" / "report" / "align_frontier.png", y), reports)
    out += _final_table(results, kept, diverged, bon, oracle)
    for a, b, _ in ALIGN_CLAIMS if oracle else []:  # the trained pairs of the claims (best-of-N is in the claims table)
        if a in kept and b in kept:
            out += _equal_kl(a, b, kept, verdicts)
    return out


def _as_result(bon: dict) -> dict:
    """Best-of-N's rows as a one-run result (``seed_points`` reads ``runs.*.evals``)."""
    return {"runs": {"bon": {"evals": bon["rows"]}}}


def _bon_var(bon: dict, grid: np.ndarray, per_token: bool = False) -> float:
    """Variance of best-of-N's mean reward over ``grid``, from its SE over prompts (taken as fully
    correlated along the curve: the mean of the interpolated SEs, squared; nan without SEs);
    ``per_token``: KL and SE divided by each row's mean length (the length taken as fixed)."""
    div = np.array([r.get("length", np.nan) if per_token else 1.0 for r in bon["rows"]], float)
    kl = np.array([r["kl"] for r in bon["rows"]], float) / div
    se = np.array([r.get("oracle_reward_se", np.nan) for r in bon["rows"]], float) / div
    order = np.argsort(kl)
    return float(np.interp(grid, kl[order], se[order]).mean() ** 2)


def _claim(a: str, b: str, claim: str, kept: dict, diverged: dict, bon: dict | None, verdicts: Verdicts,
           base: str | None = None, per_token: bool = False) -> Claim:
    """One claim row: a − b in mean oracle reward over the KL range both reach; either side may be
    best-of-N (one run with an SE over prompts instead of seeds); ``per_token``: r*/token over the
    KL/token range."""
    res = {m: _as_result(bon) if m == "best_of_n" else kept[m] for m in (a, b)}
    means = seed_means_at_equal_kl(res[a], res[b], per_token=per_token)
    note = "".join(f"; {m} {', '.join(diverged[m])} diverged, excluded" for m in (a, b) if m in diverged)
    if means is None:
        effect = Effect(None, None, 0, "KL ranges do not overlap" + note)
    elif "best_of_n" in (a, b):
        own = {f"var_{side}": _bon_var(bon, means[2], per_token) for side, m in (("a", a), ("b", b))
               if m == "best_of_n"}
        seeds = len(means[1] if a == "best_of_n" else means[0])
        effect = welch(means[0], means[1], **own, basis=f"best-of-N's SE over prompts + {seeds} seeds" + note)
    else:
        effect = welch(means[0], means[1], basis=f"Welch over {len(means[0])} + {len(means[1])} seeds" + note)
    failing = dict.fromkeys(involved(a, res[a]["runs"], verdicts) + involved(b, res[b]["runs"], verdicts)
                            + (verdicts.failing("sft", [base]) if base else []))  # π_sft: every method's start
    measured = "r*/token over the common KL/token range" if per_token else "oracle r* over the common KL range"
    return Claim(claim, f"{a} − {b}: mean {measured}", effect, +1, tuple(failing))


def claims(metrics: Path, verdicts: Verdicts, base: str | None = None) -> list[Claim]:
    """The claims on r*; none without an oracle (the align section says why). ``base``: the SFT run
    every policy starts from and best-of-N samples (``align_sample.base``): its verdict counts too."""
    results = load_align(metrics)
    bon = read_json(metrics / "align" / "best_of_n.json")
    if not has_oracle(results, bon):
        return []
    kept, diverged = split(results)
    have = set(kept) | ({"best_of_n"} if bon and bon.get("rows") else set())
    rows = [_claim(a, b, c, kept, diverged, bon, verdicts, base) for a, b, c in ALIGN_CLAIMS if a in have and b in have]
    return rows + [_claim(a, b, c, kept, diverged, bon, verdicts, base, per_token=True)
                   for a, b, c in PER_TOKEN_CLAIMS if a in have and b in have]
