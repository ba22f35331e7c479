"""Exact distributional estimators, length distributions and surface text metrics."""

from beyondlm.metrics.distributional import (
    Estimate,
    ReverseKL,
    conditional_reverse_kl,
    forward_kl,
    mean_estimate,
    per_token,
    perplexity,
    ratio_estimate,
    total_variation,
)
from beyondlm.metrics.length import impossible_at_data_lengths, length_histogram, length_report, tvd_noise, tvd_of_counts
from beyondlm.metrics.text import distinct_n, mean_length, rep_n, sample_metrics, token_repetition

__all__ = [
    "Estimate",
    "ReverseKL",
    "conditional_reverse_kl",
    "distinct_n",
    "forward_kl",
    "impossible_at_data_lengths",
    "length_histogram",
    "length_report",
    "mean_estimate",
    "mean_length",
    "per_token",
    "perplexity",
    "ratio_estimate",
    "rep_n",
    "sample_metrics",
    "token_repetition",
    "total_variation",
    "tvd_noise",
    "tvd_of_counts",
]
