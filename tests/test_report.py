import json
import math
import subprocess
import sys

import numpy as np
import pytest

from beyondlm.align.analysis import diverged_seeds, seed_means_at_equal_kl
from beyondlm.report import all_claims, build_report, collect, seed_effect, verdict, Verdicts
from beyondlm.report.convergence import table


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _conv(converged=True, rel=0.004, best=120):
    return {"converged": converged, "rel_improvement": rel, "tol": 0.01, "window": 0.25, "best_step": best,
            "best_valid_loss": 3.0, "final_valid_loss": 3.01, "n_evals": 10}


def _length(mean):
    return {"samples_mean": mean, "data_mean": 20.0, "tvd": 0.1, "tvd_noise": 0.05, "tvd_noise_q95": 0.08,
            "hist": {"length": [1, 2, 3], "samples": [1, 2, 1], "data": [2, 1, 1]}}


def test_report_aggregates_seeds_as_mean_and_std(tmp_path):
    for seed, ppl, fkl in [(0, 10.0, 1.0), (1, 12.0, 3.0)]:
        _write(tmp_path / f"metrics/evaluate/mle-s{seed}.json",
               {"test": {"perplexity": ppl}, "exact": {"forward_kl": fkl, "tvd": 0.5, "data_entropy_rate": 2.0},
                "samples": {"distinct_2": 0.5}, "reference": {"distinct_2": 0.6, "rep_2": 0.1, "mean_length": 20},
                "length": _length(18.0 + seed)})
        _write(tmp_path / f"metrics/sft/mle-s{seed}.json", {"objective": "mle", "valid": {"perplexity": ppl + 1},
                                                            "train": {"final_loss": 2.0, "wall_s": 10},
                                                            "convergence": _conv()})
    _write(tmp_path / "metrics/evaluate/tailr-g0.1-s0.json", {"test": {"perplexity": 11.0}, "exact": {"forward_kl": 2.0, "tvd": 0.4}})
    (tmp_path / "live/sft/mle-s0/plots/metrics/train").mkdir(parents=True)
    (tmp_path / "live/sft/mle-s0/plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t3.0\n2\t2.5\n")
    _write(tmp_path / "metrics/prepare.json", {"vocab_size": 9, "train": {"n_texts": 3, "n_tokens": 30, "mean_length": 10.0}})
    text = build_report(tmp_path, n_examples=2)
    # mean ± sample std (ddof=1): PPL 11 ± 1.414, forward KL 2 ± 1.414; both mle seeds converged
    assert "| mle | 2 | 2/2 | 11.000 ± 1.414 | 2.000 ± 1.414 |" in text
    assert "| tailr-g0.1 | 1 | 0/1 | 11.000 | 2.000 |" in text  # no sft metrics: no verdict
    assert "| mle | 2 | mle | 12.000 ± 1.414 |" in text  # training table: valid PPL
    assert "entropy-rate floor of test PPL 7.389" in text  # e^2
    assert "| mle | 18.5 ± 0.7 | 20.0 | 0.100 ± 0.000 | 0.050 (0.080) | 2/2 seeds |" in text  # length table
    # one tailr seed: the claims rows say why they cannot conclude
    assert "| tailr-g0.1 − mle: `exact.tvd` | -0.1 | Welch over 1 + 2 seeds; not converged: sft/tailr-g0.1-s0 |" in text
    assert "**inconclusive: not converged; 1 run; no SE**" in text
    for png in ("loss", "kl", "lengths"):
        assert (tmp_path / f"plots/report/{png}.png").exists()
    assert (tmp_path / "report.md").read_text() == text
    assert "reverse KL on possible samples" not in text.lower()
    assert "**Claims: 0 supports, 0 contradicts, 4 inconclusive**" in (tmp_path / "claims.md").read_text()


@pytest.mark.parametrize("effect, se, sign, n, conv, expected", [
    (1.0, 0.4, +1, 3, True, "supports"),
    (0.8, 0.4, +1, 3, True, "supports"),  # exactly 2 SE
    (-1.0, 0.4, +1, 3, True, "contradicts"),
    (-1.0, 0.4, -1, 5, True, "supports"),
    (0.5, 0.4, +1, 3, True, "inconclusive: effect within 2 SE"),
    (0.0, 0.0, +1, 3, True, "inconclusive: effect within 2 SE"),
    (1.0, 0.4, +1, 2, True, "inconclusive: 2 runs"),
    (1.0, 0.4, +1, 3, False, "inconclusive: not converged"),
    (1.0, None, -1, 1, False, "inconclusive: not converged; 1 run; no SE"),
    (float("nan"), 0.1, +1, 3, True, "inconclusive: no data"),
    (None, None, +1, 0, False, "inconclusive: not converged; no data"),
])
def test_verdict_rule(effect, se, sign, n, conv, expected):
    assert verdict(effect, se, claimed_sign=sign, n=n, converged=conv) == expected


def test_seed_effect_paired_and_welch():
    paired = seed_effect({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 0.0, 2: 1.0})  # differences 1, 2, 3
    assert (paired.value, paired.n, paired.basis) == (2.0, 3, "paired over 3 seeds")
    assert paired.se == pytest.approx(1 / math.sqrt(3))
    welch = seed_effect({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 5: 1.0})  # different seeds: independent
    assert welch.value == pytest.approx(1.5) and welch.n == 2
    assert welch.se == pytest.approx(math.sqrt(1.0 / 3 + 0.5 / 2))
    one = seed_effect({0: 1.0}, {0: 0.0, 1: 1.0})
    assert one.n == 1 and math.isnan(one.se)


def _sft_family(tmp_path, bad=()):
    """mle and tailr-g1 over 3 seeds: tailr's TVD lower by 0.1 (clear), forward KL higher by 0.5."""
    for seed in range(3):
        for variant, obj, tvd, fkl in (("mle", "mle", 0.50, 1.0), ("tailr-g1", "tailr", 0.40, 1.5)):
            run = f"{variant}-s{seed}"
            conv = None if run in bad and bad[run] is None else _conv(run not in bad, rel=0.03 if run in bad else 0.004)
            sft = {"objective": obj, **({"convergence": conv} if conv is not None else {})}
            _write(tmp_path / f"metrics/sft/{run}.json", sft)
            _write(tmp_path / f"metrics/evaluate/{run}.json",
                   {"exact": {"tvd": tvd + 0.01 * seed, "forward_kl": fkl + 0.02 * seed}})


def test_convergence_table_and_not_converged_comparisons(tmp_path):
    _sft_family(tmp_path, bad={"tailr-g1-s1": False, "mle-s2": None})
    _write(tmp_path / "metrics/align/reward.json", {"convergence": _conv()})
    _write(tmp_path / "metrics/align/method/dpo_pref.json", {"runs": {"s0": {"evals": [], "convergence": _conv()}}})
    _write(tmp_path / "metrics/vq.json", {"convergence": {"posterior": _conv(), "prior": _conv(False, 0.2, 50)}})
    rows = collect(tmp_path / "metrics")
    assert [(r.stage, r.run) for r in rows][-5:] == [("sft", "tailr-g1-s2"), ("reward", "reward"),
                                                     ("align", "dpo_pref-s0"), ("vq", "posterior"), ("vq", "prior")]
    text = build_report(tmp_path, n_examples=0)
    assert "| sft | tailr-g1-s1 | no | 3.00% | – / – | 120 | 3.0000 / 3.0100 |" in text
    assert "| sft | mle-s2 | no (no verdict recorded) | – | – / – | – | – / – |" in text
    assert "| vq | prior | no | 20.00% | – / – | 50 |" in text and "| reward | reward | yes | 0.40% | – / – | 120 |" in text
    tvd_row = next(ln for ln in text.splitlines() if "`exact.tvd`" in ln)
    assert "not converged: sft/tailr-g1-s1, sft/mle-s2" in tvd_row and "**inconclusive: not converged**" in tvd_row
    assert "| mle | 3 | 2/3 |" in text and "| tailr-g1 | 3 | 2/3 |" in text  # evaluation table: converged seeds
    # every run converged: the same numbers give verdicts
    _sft_family(tmp_path)
    claims = {c.comparison: c for c in all_claims(tmp_path / "metrics", Verdicts(collect(tmp_path / "metrics")), None)}
    tvd, fkl = claims["tailr-g1 − mle: `exact.tvd`"], claims["tailr-g1 − mle: `exact.forward_kl`"]
    assert tvd.effect.value == pytest.approx(-0.1) and tvd.effect.se == pytest.approx(0.0, abs=1e-12)
    assert tvd.verdict == "supports" and fkl.verdict == "contradicts"  # TaiLr claims no coverage cost
    assert claims["tailr-g1 − mle: `exact.reverse_kl_cond`"].verdict == "inconclusive: no data"


def test_a_run_that_never_improved_is_not_converged(tmp_path):
    """Best held-out value at step 0: the rule's ratio is 0, but the kept checkpoint is the start."""
    _write(tmp_path / "metrics/align/method/dpo_pref.json",
           {"runs": {"s0": {"evals": [], "convergence": _conv(True, rel=0.0, best=0)},
                     "s1": {"evals": [], "convergence": _conv(True, rel=0.0, best=30)}}})
    rows = collect(tmp_path / "metrics")
    assert [r.converged for r in rows] == [False, True] and rows[0].never_improved
    assert Verdicts(rows).failing("align", ["dpo_pref-s0", "dpo_pref-s1"]) == ["align/dpo_pref-s0"]
    assert "| align | dpo_pref-s0 | no: never improved (best at step 0) | 0.00% |" in "\n".join(table(rows))


def _align_run(scale, final_kl=2.0, converged=True):
    evals = [{"step": s, "kl": final_kl * s / 20, "oracle_reward": scale * s / 10, "rm_reward": 0.0,
              "win_vs_sft/oracle": 0.5, "length": 9.0} for s in (0, 10, 20)]
    return {"evals": evals, "convergence": _conv(converged)}


def _align(tmp_path, diverged_kl=None, converged=True):
    for method, scales in (("exo_pref", (2.0, 2.2)), ("dpo_pref", (1.0, 1.2))):
        runs = {f"s{i}": _align_run(c, converged=converged) for i, c in enumerate(scales)}
        if method == "exo_pref" and diverged_kl:
            runs["s2"] = _align_run(9.0, final_kl=diverged_kl)
        _write(tmp_path / "metrics" / "align" / "method" / f"{method}.json",
               {"method": method, "sft": runs["s0"]["evals"][0], "runs": runs})
    _write(tmp_path / "metrics" / "align" / "best_of_n.json",
           {"rows": [{"N": n, "kl": kl, "oracle_reward": 3 * kl, "oracle_reward_se": 0.1, "rm_reward": 0.0}
                     for n, kl in ((1, 0.0), (4, 0.636), (16, 1.835))]})


def test_alignment_section_tables_frontier_and_equal_kl(tmp_path):
    from beyondlm.report import align_section

    _align(tmp_path, diverged_kl=200.0)
    text = "\n".join(align_section(tmp_path / "metrics", tmp_path))
    # the runaway seed (KL 200 vs 2) is listed and left out of the means: (4 + 4.4)/2
    assert "excluded from means and comparisons: exo_pref: s2." in text
    assert "| exo_pref | 2 (+1 diverged) | 2.00 ± 0.00 | 4.20 ± 0.28 |" in text
    assert "| best-of-1 |" in text and (tmp_path / "plots" / "report" / "align_frontier.png").exists()
    # difference k at KL k, SE sqrt(0.02)·k: beyond 2 SE everywhere
    assert "exo_pref higher by more than 2 SE at 4 of 4 KL values, lower at 0" in text
    _align(tmp_path, converged=False)
    text = "\n".join(align_section(tmp_path / "metrics", tmp_path))
    assert "**exo_pref vs dpo_pref at equal KL** (each seed's frontier interpolated; difference of seed means ± SE): " \
           "inconclusive: not converged (align/exo_pref-s0, align/exo_pref-s1" in text


def test_diverged_seed_rule_and_equal_kl_seed_means():
    def res(*finals):
        return {"runs": {f"s{i}": {"evals": [{"step": 0, "kl": 0.0}, {"step": 1, "kl": k}]}
                         for i, k in enumerate(finals)}}

    assert diverged_seeds(res(2.0, 2.5, 30.0)) == ["s2"]  # 30 > 10 × median(2, 2.5)
    assert diverged_seeds(res(2.0, 2.5, 20.0)) == []
    assert diverged_seeds(res(0.01, 0.02, 0.5)) == []  # the others' median is floored at 0.1 nats
    assert diverged_seeds(res(1.0, float("nan"))) == ["s1"] and diverged_seeds(res(50.0)) == []
    a = {"runs": {"s0": {"evals": [{"kl": 0.0, "oracle_reward": 0.0}, {"kl": 2.0, "oracle_reward": 2.0}]}}}
    b = {"runs": {"s0": {"evals": [{"kl": 0.0, "oracle_reward": 1.0}, {"kl": 1.0, "oracle_reward": 1.0}]}}}
    va, vb, grid = seed_means_at_equal_kl(a, b, n_grid=3)  # common range [0, 1], interior 0.25, 0.5, 0.75
    np.testing.assert_allclose(grid, [0.25, 0.5, 0.75])
    assert va == pytest.approx([0.5]) and vb == pytest.approx([1.0])
    # per token: each evaluation's mean r* and KL over its mean length (a's second point: 20 tokens)
    a = {"runs": {"s0": {"evals": [{"kl": 0.0, "oracle_reward": 0.0, "length": 10.0},
                                   {"kl": 4.0, "oracle_reward": 4.0, "length": 20.0}]}}}
    b = {"runs": {"s0": {"evals": [{"kl": 0.0, "oracle_reward": 0.0, "length": 10.0},
                                   {"kl": 2.0, "oracle_reward": 1.0, "length": 10.0},
                                   {"kl": 9.0, "oracle_reward": 9.0}]}}}  # no length: left out per token
    va, vb, grid = seed_means_at_equal_kl(a, b, n_grid=3, per_token=True)  # range [0, 0.2] per token
    np.testing.assert_allclose(grid, [0.05, 0.1, 0.15])
    assert va == pytest.approx([0.1]) and vb == pytest.approx([0.05])


def test_claims_rows_for_align_ebm_knnlm_vq(tmp_path):
    m = tmp_path / "metrics"
    _align(tmp_path)
    for i in range(2):
        _write(m / "align" / "method" / "dpo_pref.json",
               {"runs": {f"s{j}": _align_run(1.0 + 0.2 * j) for j in range(3)}, "sft": {}})
        _write(m / "align" / "method" / "exo_pref.json",
               {"runs": {f"s{j}": _align_run(2.0 + 0.2 * j) for j in range(3)}, "sft": {}})
    _write(m / "sft/mle-s0.json", {"objective": "mle", "convergence": _conv()})
    _write(m / "ebm.json", {"base": "mle-s0", "converged": True, "kl_in_sample": 0.01})
    _write(m / "ebm_eval.json", {"ppl": {"n_texts": 100}, "xent": {"diff_per_token": -0.02, "diff_per_token_se": 0.005},
                                 "decoders": {"sample": {"mauve": 0.80}, "sample_b": {"mauve": 0.78},
                                              "sir_m2": {"mauve": 0.82}, "sir_m8": {"mauve": 0.85}}})
    _write(m / "knnlm.json", {"valid": {"best": {"k": 64, "lambda": 0.25}},
                              "test": {"lm_ppl": 20.0, "lm_forward_kl": 1.0, "best": {"k": 8, "lambda": 0.5},
                                       "k": {"64": {"ppl": {"0.25": 19.0}, "forward_kl": {"0.25": 0.9}}}}})
    _write(m / "vq.json", {"convergence": {"posterior": _conv(), "prior": _conv()},
                           "test": {"nll_bound_per_token": 3.9}, "samples": {"impossible_frac": 0.3},
                           "baseline": {"dir": "models/sft/mle-s0", "test": {"nll_per_token": 3.4},
                                        "samples": {"impossible_frac": 0.2}}})
    found = {c.comparison: c for c in all_claims(m, Verdicts(collect(m)), "mle-s0")}
    exo = found["exo_pref − dpo_pref: mean oracle r* over the common KL range"]
    # per seed, reward = scale·KL/2·... on the common grid: exo seeds 2.0, 2.2, 2.4 vs dpo 1.0, 1.2, 1.4 (× mean KL)
    assert exo.effect.n == 3 and exo.effect.value > 0 and exo.verdict == "supports"
    assert exo.effect.basis == "Welch over 3 + 3 seeds"
    per_token = found["exo_pref − dpo_pref: mean r*/token over the common KL/token range"]
    assert per_token.claim.endswith("per token (length-normalised)")
    assert per_token.effect.value == pytest.approx(exo.effect.value / 9.0)  # every sample 9 tokens long
    xent = found["p* − p_θ: nats/token on test"]
    assert (str(xent.effect), xent.effect.n, xent.verdict) == ("-0.02 ± 0.005", 100, "supports")
    assert xent.effect.basis == "100 test texts, 1 run (base `mle-s0`)"
    mauve = found["sir_m8 − sample: MAUVE"]
    assert mauve.effect.value == pytest.approx(0.05) and "two plain draws differ by 0.020" in mauve.effect.basis
    assert mauve.verdict == "inconclusive: 1 run; no SE"
    ppl = found["kNN-LM − LM: test ppl"]  # at valid's (k, λ) = (64, 0.25), not test's own best
    assert ppl.effect.value == pytest.approx(-1.0) and "k=64, λ=0.25 tuned on valid" in ppl.effect.basis
    assert found["kNN-LM − LM: test forward_kl"].effect.value == pytest.approx(-0.1)
    assert found["plan − LM: test NLL/token"].effect.value == pytest.approx(0.5)
    assert found["plan − LM: log p_d/token"].verdict == "inconclusive: no data"
    bon = [c for c in found.values() if c.comparison.startswith("best_of_n")]
    assert bon == []  # best-of-N is compared with the -rw methods only, absent here
    assert all(not c.failing for c in found.values())
    # π_sft (align_sample.base) did not converge: every alignment claim starts from it, so none stands
    _write(m / "sft/mle-s0.json", {"objective": "mle", "convergence": {**_conv(), "converged": False}})
    exo = {c.comparison: c for c in all_claims(m, Verdicts(collect(m)), None, None, "mle-s0")}[exo.comparison]
    assert exo.failing == ("sft/mle-s0",) and exo.verdict == "inconclusive: not converged"


def test_best_of_n_claim_uses_its_se_over_prompts(tmp_path):
    m = tmp_path / "metrics"
    _align(tmp_path)
    for method in ("dpo_rw", "exo_rw"):
        _write(m / "align" / "method" / f"{method}.json", {"runs": {f"s{j}": _align_run(1.0 + 0.1 * j) for j in range(3)},
                                                           "sft": {}})
    _write(m / "align/reward.json", {"convergence": _conv(False)})
    found = {c.comparison: c for c in all_claims(m, Verdicts(collect(m)), None)}
    bon = found["best_of_n − dpo_rw: mean oracle r* over the common KL range"]
    # on the grid inside [0, 1.835]: BoN reward 3·KL vs dpo_rw ≈ (1..1.2)·KL, so BoN is clearly higher;
    # SE² = var(dpo seeds)/3 + 0.1² (BoN's SE over prompts)
    assert bon.effect.n == 3 and bon.effect.value > 0 and bon.effect.se > 0.1
    assert bon.failing == ("reward/reward",) and bon.verdict == "inconclusive: not converged"
    # per token: best-of-N's rows 4 tokens long, the policies' 9: r*/token at equal KL/token, its SE over
    # prompts divided by the length too
    bon_rows = json.loads((m / "align" / "best_of_n.json").read_text())["rows"]
    _write(m / "align" / "best_of_n.json", {"rows": [{**r, "length": 4.0} for r in bon_rows]})
    found = {c.comparison: c for c in all_claims(m, Verdicts(collect(m)), None)}
    tok = found["best_of_n − dpo_rw: mean r*/token over the common KL/token range"]
    # BoN: r* = 3·KL, so r*/token = 3·(KL/token); dpo_rw seed j: (1 + 0.1j)·(KL/token), KL/token up to
    # 2/9; grid = the 4 interior points of [0, 2/9], mean 1/9 → effect (3 − 1.1)/9; SE² = (0.1/4)² (BoN's
    # SE over prompts, per token) + var(dpo_rw seed means)/3 = (0.1/9)²/3
    assert tok.claim.endswith("per token (length-normalised)")
    assert tok.effect.value == pytest.approx(1.9 / 9)
    assert tok.effect.se == pytest.approx(math.sqrt((0.1 / 4) ** 2 + (0.1 / 9) ** 2 / 3))


def test_ebm_eval_imports_only_its_figure_module():
    code = ("import sys; from beyondlm.report import plot_quality_vs_m; "
            "print(sorted(m for m in sys.modules if m.startswith('beyondlm.report')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['beyondlm.report', 'beyondlm.report.common', 'beyondlm.report.ebm_plot']"


def test_vq_and_knnlm_sections(tmp_path):
    from beyondlm.report import knnlm_section, vq_section

    samples = {"rep_2": 0.01, "distinct_2": 0.7, "tr_32": 0.1, "mean_length": 12.0, "unfinished_frac": 0.0,
               "impossible_frac": 0.5, "logp_data_per_token": -2.5}
    _write(tmp_path / "metrics" / "vq.json", {
        "discretizer": "gumbel", "n_codes": 64, "n_down": 2, "codebook": {"perplexity": 23.1, "dead_codes": 11},
        "test": {"recon_nll_per_token": 3.2, "nll_bound_per_token": 3.9, "data_entropy_rate": 2.93},
        "samples": samples, "baseline": {"dir": "models/sft/mle-s0", "test": {"nll_per_token": 3.38},
                                         "samples": samples}})
    text = "\n".join(vq_section(tmp_path / "metrics"))
    assert "perplexity 23.1, 11 dead codes" in text and "baseline `models/sft/mle-s0` 3.380" in text
    assert "| prior → decoder | 0.0100 | 0.700 | 0.100 | 12.0 | 0.000 | 0.500 | -2.500 |" in text
    assert "Codebook collapsed" not in text
    # one effective code on test: the section says so, and no latent-plan claim stands
    v = json.loads((tmp_path / "metrics" / "vq.json").read_text())
    _write(tmp_path / "metrics" / "vq.json", {**v, "codebook": {"perplexity": 1.0, "dead_codes": 63},
                                              "convergence": {"posterior": _conv(), "prior": _conv()}})
    _write(tmp_path / "metrics" / "sft/mle-s0.json", {"objective": "mle", "convergence": _conv()})
    assert "**Codebook collapsed**: test perplexity 1.00" in "\n".join(vq_section(tmp_path / "metrics"))
    from beyondlm.report import vq as vq_report
    rows = vq_report.claims(tmp_path / "metrics", Verdicts(collect(tmp_path / "metrics")))
    assert [c.verdict for c in rows] == ["inconclusive: codebook collapsed; 1 run; no SE"] * 3
    _write(tmp_path / "metrics" / "knnlm.json", {
        "index": {"cfg/kind": "ivfpq", "recall@256": 0.95},
        "valid": {"lm_ppl": 40.0, "best": {"ppl": 33.5, "k": 256, "lambda": 0.25}}})
    (tmp_path / "plots" / "knnlm").mkdir(parents=True)
    (tmp_path / "plots" / "knnlm" / "ppl.tsv").write_text("split\tk\tlambda\tppl\nvalid\t256\t0.0\t40\nvalid\t256\t0.25\t33.5\n")
    text = "\n".join(knnlm_section(tmp_path / "metrics", tmp_path))
    assert "recall@256 against exact search 0.950" in text and "| valid | 40.000 | 33.500 | 256 | 0.25 | – | – |" in text
    assert (tmp_path / "plots" / "report" / "knnlm.png").exists()


def test_knnlm_gate_rows_and_target_sentence():
    from beyondlm.report.knnlm import gate_rows

    row = lambda saved, ppl, vs_full, vs_fixed: {"queries_saved": saved, "ppl": ppl, "vs_full": vs_full,  # noqa: E731
                                                  "vs_fixed": vs_fixed, "ppl_learned_mix": ppl - 0.1}
    gate = {"k": 256, "fixed_lambda": 0.1, "n_fit": 100, "n_test": 200, "groups_by": "word_class", "ppl_tolerance": 0.01,
            "test_ppl": {"lm": 18.0, "fixed": 17.9, "learned": 17.5, "adaptive": 17.8},
            "mean_lambda": {"learned": {"all": 0.2, "n_content": 80, "content": 0.3, "n_function": 120, "function": 0.1},
                            "adaptive": {"all": 0.15, "n_content": 80, "content": 0.2, "n_function": 120, "function": 0.1}},
            "adaptive": {"0.0": row(0.0, 17.8, 1.0, 0.9944), "0.1": row(0.42, 17.95, 1.0084, 1.0028),
                         "0.2": row(0.8, 18.0, 1.0112, 1.0056)}}
    gate["best_saving"] = {"full": {"tau": 0.1, **gate["adaptive"]["0.1"]}, "fixed": {"tau": 0.2, **gate["adaptive"]["0.2"]}}
    text = "\n".join(gate_rows(gate))
    assert "| learned λ (LM + retrieval features) | 17.500 | 0.200 | 0.300 | 0.100 |" in text
    assert "| 0.1 | 42.0% | 17.950 | +0.84% | +0.28% | – | 17.850 |" in text
    assert "against every query with the same gate: met, 42.0% saved at τ=0.1 (+0.84%)" in text
    gate["test_ppl"]["lm"] = 17.95  # the LM alone within +1% of full retrieval (17.8): any saving is "within budget"
    text = "\n".join(gate_rows(gate))
    assert "against every query with the same gate: met only vacuously, 42.0% saved at τ=0.1 (+0.84%)" in text
    gate["best_saving"]["fixed"] = None
    assert "against the fixed-λ kNN-LM: not met, no threshold stays within it" in "\n".join(gate_rows(gate))
    assert gate_rows(None) == []


def test_bond_claim_has_best_of_n_as_its_baseline(tmp_path):
    """BOND is compared with the best-of-N it imitates: best-of-N on the baseline side brings its
    SE over prompts as var_b; the section's title and claims list every method present."""
    from beyondlm.report import align_section

    m = tmp_path / "metrics"
    _align(tmp_path)
    _write(m / "align" / "method" / "bond.json", {"runs": {f"s{j}": _align_run(4.0 + 0.2 * j) for j in range(3)},
                                                  "sft": {}})
    _write(m / "align/reward.json", {"convergence": _conv()})
    found = {c.comparison: c for c in all_claims(m, Verdicts(collect(m)), None)}
    bond = found["bond − best_of_n: mean oracle r* over the common KL range"]
    # bond's seeds 4.0, 4.2, 4.4 per unit KL/2 (reward = scale·KL/2 along its frontier) vs best-of-N's 3·KL
    assert bond.effect.n == 3 and bond.effect.se > 0.1 and "best-of-N's SE over prompts + 3 seeds" in bond.effect.basis
    assert not bond.failing
    text = "\n".join(align_section(m, tmp_path))
    assert text.startswith("## Alignment: ") and "bond" in text.splitlines()[0]


def test_graph_section_from_the_graph_stage_metrics(tmp_path):
    from beyondlm.report.knnlm import graph_section

    assert graph_section(tmp_path) == []
    check = {"co_occurs": {"edges": 6, "producible": 1.0, "random_pairs_producible": 0.8, "recall": 0.25}}
    _write(tmp_path / "graph.json", {"source": "mined", "n_nodes": 4, "n_edges": 6, "n_edges_per_relation": {"co_occurs": 6},
                                     "degree": {"mean": 3.0, "max": 3}, "components": 1, "largest_component_fraction": 1.0,
                                     "language_check": check})
    text = "\n".join(graph_section(tmp_path))
    assert "4 nodes, 6 edges (6 co_occurs); mean degree 3.0 (max 3); 1 component(s), the largest holding 100%" in text
    assert "| co_occurs | 6 | 1.000 | 0.800 | 0.250 |" in text


def test_the_report_knows_which_methods_use_the_reward_model():
    """USES_REWARD_MODEL (a reward model that did not converge makes their comparisons
    inconclusive) is every group and online row of the loss table, plus best-of-N."""
    from beyondlm.objectives.preference import PREFERENCE_LOSSES
    from beyondlm.report.align import USES_REWARD_MODEL

    rows = {name for name, row in PREFERENCE_LOSSES.items() if row.kind in ("group", "online")}
    assert set(USES_REWARD_MODEL) == rows | {"best_of_n"}


def _lock_entry(outs, params, deps=()):
    import hashlib

    def md5(p):
        return hashlib.md5(p.read_bytes()).hexdigest()

    return {"cmd": "x", "params": {"params.yaml": params},
            "deps": [{"path": d.name if hasattr(d, "name") else d, "hash": "md5", "md5": "0"} for d in deps],
            "outs": [{"path": rel, "hash": "md5", "md5": md5(path)} for rel, path in outs]}


def _eval_metrics(ppl, exact=True):
    m = {"test": {"perplexity": ppl}, "samples": {"distinct_2": 0.5},
         "reference": {"distinct_2": 0.6, "rep_2": 0.1, "mean_length": 20}}
    return {**m, "exact": {"forward_kl": 1.0, "tvd": 0.5}} if exact else m


def test_report_reads_only_the_current_lock_outputs_and_names_their_provenance(tmp_path):
    """A metrics file from another params hash (bytes differ from dvc.lock's md5) and one of a
    stage dvc.yaml no longer defines are left out and listed; each section names its data,
    params hash and code commit."""
    import yaml

    from beyondlm.report.provenance import Provenance

    root = tmp_path
    rep = root / "reports"
    current = rep / "metrics/evaluate/mle-s0.json"
    _write(current, _eval_metrics(10.0))
    _write(rep / "metrics/prepare.json", {"vocab_size": 9, "train": {"n_texts": 3, "n_tokens": 30, "mean_length": 10.0}})
    stale = rep / "metrics/evaluate/emo-s0.json"  # lock has the md5 of its old content
    _write(stale, _eval_metrics(99.0))
    old_bytes = stale.read_bytes()
    gone = rep / "metrics/evaluate/mixce-s0.json"  # its stage is no longer in dvc.yaml
    _write(gone, _eval_metrics(77.0))
    (root / "stages").mkdir()
    (root / "stages/evaluate.py").write_text("print(1)\n")
    lock = {"prepare": _lock_entry([("reports/metrics/prepare.json", rep / "metrics/prepare.json")],
                                   {"prepare": {"source": "synthetic"}}),
            "evaluate@mle-0": _lock_entry([("reports/metrics/evaluate/mle-s0.json", current)], {"evaluate": {"seed": 0}},
                                          ["stages/evaluate.py"]),
            "evaluate@emo-0": _lock_entry([("reports/metrics/evaluate/emo-s0.json", stale)], {"evaluate": {"seed": 0}}),
            "evaluate@mixce-0": _lock_entry([("reports/metrics/evaluate/mixce-s0.json", gone)], {"evaluate": {"seed": 0}})}
    _write(stale, _eval_metrics(55.0))  # rewritten by another experiment: not what dvc.lock recorded
    assert stale.read_bytes() != old_bytes
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "stages"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "code"], cwd=root, check=True)
    sha = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=root, capture_output=True, text=True).stdout.strip()

    prov = Provenance.from_workspace(root, {"prepare", "evaluate@mle-0", "evaluate@emo-0"})
    text = build_report(rep, n_examples=1, provenance=prov)
    assert "| mle | 1 |" in text and "10.000" in text
    assert "emo" not in text.split("## Left out")[0] and "mixce" not in text.split("## Left out")[0]
    assert "- `reports/metrics/evaluate/emo-s0.json`" in text and "- `reports/metrics/evaluate/mixce-s0.json`" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("_Provenance") and "evaluate" in ln)
    assert "data synthetic (embedded language)" in line and f"code at commit `{sha}`" in line
    assert f"params `{prov.params_hash(('sft', 'evaluate'))}`" in line
    # another params value: another hash; edited code: said so
    other = Provenance(root, {**prov.lock, "evaluate@mle-0": {**prov.lock["evaluate@mle-0"],
                                                             "params": {"params.yaml": {"evaluate": {"seed": 1}}}}})
    assert other.params_hash(("evaluate",)) != prov.params_hash(("evaluate",))
    (root / "stages/evaluate.py").write_text("print(2)\n")
    assert prov.commit(("evaluate",)) == f"{sha} + uncommitted changes"
    # outside a DVC workspace (no provenance) every file is read, as before
    assert "99.000" not in build_report(rep, n_examples=1) and "55.000" in build_report(rep, n_examples=1)


def test_without_a_known_data_distribution_the_exact_metrics_are_na(tmp_path):
    _write(tmp_path / "metrics/evaluate/mle-s0.json", _eval_metrics(10.0, exact=False))
    text = build_report(tmp_path, n_examples=1)
    assert "n/a: no known data distribution" in text
    assert "exact-likelihood" not in text and "known data distribution." not in text
    assert "| mle | 1 |" in text and "10.000" in text
    _write(tmp_path / "metrics/evaluate/mle-s0.json", _eval_metrics(10.0))
    text = build_report(tmp_path, n_examples=1)
    assert "exact-likelihood Monte Carlo estimates" in text and "n/a" not in text


def test_data_section_says_what_r_star_is_and_how_many_texts_were_cut(tmp_path):
    _write(tmp_path / "metrics/prepare.json",
           {"vocab_size": 9, "train": {"n_texts": 3, "n_tokens": 30, "mean_length": 10.0, "truncated_frac": 0.25}})
    _write(tmp_path / "metrics/oracle.json", {"kind": "classifier", "exact": False, "test_accuracy": 0.9018, "n_test": 25000})
    text = build_report(tmp_path, n_examples=1)
    assert "25.0% of them cut at prepare.max_len" in text
    assert "test accuracy 0.902 on 25000 held-out labelled texts" in text
    _write(tmp_path / "metrics/oracle.json", {"kind": "language", "exact": True})
    assert "exact posterior log-odds" in build_report(tmp_path, n_examples=1)


def test_loss_plot_draws_each_runs_held_out_curve_in_its_colour(tmp_path, monkeypatch):
    from beyondlm.report import lm

    for split, rows in (("train", "10\t5.0\n20\t4.0\n30\t3.5"), ("valid", "0\t6.0\n30\t4.2")):
        path = tmp_path / "mle-s0" / "plots" / "metrics" / split / "loss.tsv"
        path.parent.mkdir(parents=True)
        path.write_text(f"step\tloss\n{rows}\n")
    figs = []
    monkeypatch.setattr(lm, "save_fig", lambda fig, out: figs.append(fig) or out)
    lm.plot_losses(tmp_path, tmp_path / "loss.png")
    train, valid = figs[0].axes[0].get_lines()
    assert list(valid.get_xdata()) == [0.0, 30.0] and list(valid.get_ydata()) == [6.0, 4.2]
    assert valid.get_color() == train.get_color() and valid.get_linestyle() == "None"
