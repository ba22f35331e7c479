"""Exact distributional estimators and surface text metrics."""

from beyondlm.metrics.distributional import (
    Estimate,
    forward_kl,
    mean_estimate,
    per_token,
    perplexity,
    reverse_kl,
    total_variation,
)
from beyondlm.metrics.text import distinct_n, mean_length, rep_n, sample_metrics, token_repetition

__all__ = [
    "Estimate",
    "distinct_n",
    "forward_kl",
    "mean_estimate",
    "mean_length",
    "per_token",
    "perplexity",
    "rep_n",
    "reverse_kl",
    "sample_metrics",
    "token_repetition",
    "total_variation",
]
