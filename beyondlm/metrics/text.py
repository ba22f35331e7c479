"""Surface metrics of generated text, on token-id sequences (no tokenizer needed).

An empty corpus, or one with no n-gram of the requested order, gives 0.0 rather than an error,
so a degenerate sampler shows up as a number in the metrics file instead of a crash.
"""

from __future__ import annotations

from collections.abc import Sequence


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams across all sequences (0 if none)."""
    grams = [g for seq in seqs for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """seq-rep-n of Welleck et al. 2020 ("Neural Text Generation with Unlikelihood Training").

    Mean over sequences of 1 − unique n-grams / total n-grams within the sequence; sequences too
    short to hold an n-gram are skipped (they say nothing about repetition). 0 if none qualify.
    """
    per_seq = []
    for seq in seqs:
        grams = _ngrams(seq, n)
        if grams:
            per_seq.append(1.0 - len(set(grams)) / len(grams))
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def token_repetition(seqs: Sequence[Sequence[int]], window: int = 32) -> float:
    """Fraction of tokens equal to some token among the previous `window` tokens of the same sequence.

    The "rep/l" of Welleck et al. 2020 with l = window (tr-32 by default); windows never cross
    sequence boundaries. 0 if the corpus has no tokens.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    repeats = total = 0
    for seq in seqs:
        for i, tok in enumerate(seq):
            repeats += tok in seq[max(0, i - window) : i]
        total += len(seq)
    return repeats / total if total else 0.0


def mean_length(seqs: Sequence[Sequence[int]]) -> float:
    """Mean number of tokens per sequence (0 for an empty corpus)."""
    return sum(len(s) for s in seqs) / len(seqs) if len(seqs) else 0.0


def sample_metrics(
    seqs: Sequence[Sequence[int]], *, ns: Sequence[int] = (2, 3, 4), window: int = 32
) -> dict[str, float]:
    """All text metrics in one flat dict: distinct_{n}, rep_{n} per n, tr_{window}, mean_length."""
    out: dict[str, float] = {}
    for n in ns:
        out[f"distinct_{n}"] = distinct_n(seqs, n)
        out[f"rep_{n}"] = rep_n(seqs, n)
    out[f"tr_{window}"] = token_repetition(seqs, window)
    out["mean_length"] = mean_length(seqs)
    return out
