import json

from beyondlm.report import build_report


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_aggregates_seeds_as_mean_and_std(tmp_path):
    for seed, ppl, fkl in [(0, 10.0, 1.0), (1, 12.0, 3.0)]:
        _write(tmp_path / f"metrics/evaluate/mle-s{seed}.json",
               {"test": {"perplexity": ppl}, "exact": {"forward_kl": fkl, "tvd": 0.5, "data_entropy_rate": 2.0},
                "samples": {"distinct_2": 0.5}, "reference": {"distinct_2": 0.6, "rep_2": 0.1, "mean_length": 20}})
        _write(tmp_path / f"metrics/sft/mle-s{seed}.json", {"objective": "mle", "valid": {"perplexity": ppl + 1},
                                                            "train": {"final_loss": 2.0, "wall_s": 10}})
    _write(tmp_path / "metrics/evaluate/tailr-g0.1-s0.json", {"test": {"perplexity": 11.0}, "exact": {"forward_kl": 2.0, "tvd": 0.4}})
    (tmp_path / "live/sft/mle-s0/plots/metrics/train").mkdir(parents=True)
    (tmp_path / "live/sft/mle-s0/plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t3.0\n2\t2.5\n")
    _write(tmp_path / "metrics/prepare.json", {"vocab_size": 9, "train": {"n_texts": 3, "n_tokens": 30, "mean_length": 10.0}})
    text = build_report(tmp_path, n_examples=2)
    # mean ± sample std (ddof=1): PPL 11 ± 1.414, forward KL 2 ± 1.414
    assert "| mle | 2 | 11.000 ± 1.414 | 2.000 ± 1.414 |" in text
    assert "| tailr-g0.1 | 1 | 11.000 | 2.000 |" in text
    assert "| mle | 2 | mle | 12.000 ± 1.414 |" in text  # training table: valid PPL
    assert "entropy-rate floor of test PPL 7.389" in text  # e^2
    assert (tmp_path / "plots/report/loss.png").exists() and (tmp_path / "plots/report/kl.png").exists()
    assert (tmp_path / "report.md").read_text() == text


def test_alignment_section_tables_frontier_and_equal_kl(tmp_path):
    from beyondlm.report import align_section

    def run(scale):
        return {"evals": [{"step": s, "kl": s / 10, "oracle_reward": scale * s / 10, "rm_reward": 0.0,
                           "win_vs_sft/oracle": 0.5, "length": 9.0} for s in (0, 10, 20)]}

    for method, scales in (("exo_pref", (2.0, 2.2)), ("dpo_pref", (1.0, 1.2))):
        _write(tmp_path / "metrics" / "align" / "method" / f"{method}.json",
               {"method": method, "sft": run(0)["evals"][0], "runs": {f"s{i}": run(c) for i, c in enumerate(scales)}})
    _write(tmp_path / "metrics" / "align" / "best_of_n.json",
           {"rows": [{"N": 1, "kl": 0.0, "oracle_reward": 0.0, "rm_reward": 0.0}]})
    text = "\n".join(align_section(tmp_path / "metrics", tmp_path))
    assert "| exo_pref | 2 | 2.00 ± 0.00 | 4.20 ± 0.28 |" in text  # final KL 2, reward (4 + 4.4)/2
    assert "| best-of-1 |" in text and (tmp_path / "plots" / "report" / "align_frontier.png").exists()
    # difference k at KL k, SE sqrt(0.02)·k: beyond 2 SE everywhere
    assert "exo_pref higher by more than 2 SE at 4 of 4 KL values, lower at 0" in text


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
    _write(tmp_path / "metrics" / "knnlm.json", {
        "index": {"cfg/kind": "ivfpq", "recall@256": 0.95},
        "valid": {"lm_ppl": 40.0, "best": {"ppl": 33.5, "k": 256, "lambda": 0.25}}})
    (tmp_path / "plots" / "knnlm").mkdir(parents=True)
    (tmp_path / "plots" / "knnlm" / "ppl.tsv").write_text("split\tk\tlambda\tppl\nvalid\t256\t0.0\t40\nvalid\t256\t0.25\t33.5\n")
    text = "\n".join(knnlm_section(tmp_path / "metrics", tmp_path))
    assert "recall@256 against exact search 0.950" in text and "| valid | 40.000 | 33.500 | 256 | 0.25 | – | – |" in text
    assert (tmp_path / "plots" / "report" / "knnlm.png").exists()
