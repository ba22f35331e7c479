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
