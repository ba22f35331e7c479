"""Evaluate a causal LM: test perplexity, sample metrics, and on the synthetic language the exact
distributional metrics against the known p_d.

Estimators (Monte Carlo, each with a standard error; see ``beyondlm.metrics``):
- forward KL(p_d‖p_θ) = E_{x∼p_d}[log p_d(x) − log p_θ(x)] over the test split (drawn from p_d);
  per token as the ratio Σ(log p_d − log p_θ)/Σ tokens (delta-method SE);
- on the model's own samples (pure ancestral sampling at T = 1: draws from p_θ, scored by the exact
  log p_d): ``impossible_frac`` = 1 − q(A), the share p_d cannot produce (an ungrammatical
  transition, or no EOS within the language's max length: the true reverse KL is then infinite),
  and the conditional reverse KL(q_A‖p_d) of the model restricted to A, ≥ 0, per sequence and per
  token (``beyondlm.metrics.conditional_reverse_kl``);
- TVD = E_{x∼p_θ}[max(0, 1 − p_d(x)/p_θ(x))] on the same samples (impossible ones count 1);
- length: sample vs test length histograms, their TVD and its finite-sample noise level, and the
  impossible rate standardised to the data's length distribution (``beyondlm.metrics.length``);
  log p_d per token over the possible samples, so shorter outputs cannot look better.
Sequence log-probs and lengths cover every token after BOS, EOS included.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from beyondlm.config import EvaluateConfig
from beyondlm.data.synthetic import SyntheticLanguage
from beyondlm.logprobs import sequence_logps
from beyondlm.metrics import (
    conditional_reverse_kl,
    forward_kl,
    impossible_at_data_lengths,
    length_report,
    mean_estimate,
    perplexity,
    ratio_estimate,
    sample_metrics,
    total_variation,
)
from beyondlm.sampling import SamplingConfig, sample


def _content(seqs: Sequence[Sequence[int]], eos_id: int) -> list[list[int]]:
    """Tokens without BOS/EOS, for surface text metrics."""
    return [[t for t in s if t != eos_id] for s in seqs]


def evaluate_lm(model, tokenizer, test_ids: Sequence[Sequence[int]], cfg: EvaluateConfig, *,
                max_len: int, language: SyntheticLanguage | None = None,
                test_logp_data: Sequence[float] | None = None, oracle=None) -> tuple[dict, list[dict]]:
    """Metrics dict and one record per model sample: ``ids`` (without BOS), ``logp_model`` and,
    on the synthetic language, ``logp_data`` (None where p_d(x) = 0). With an ``Oracle``
    (beyondlm/oracle.py), the samples' mean r* (``samples.oracle_reward``)."""
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    test_ids = list(test_ids)[: cfg.max_test or None]
    logp_test, n_tok = sequence_logps(model, test_ids, pad_id=pad, batch_size=cfg.batch_size)
    nll = float(-logp_test.sum())
    metrics: dict = {
        "test": {
            "nll_per_token": nll / int(n_tok.sum()),
            "perplexity": perplexity(nll, int(n_tok.sum())),
            "n_texts": len(test_ids),
            "n_tokens": int(n_tok.sum()),
        }
    }
    samples = sample(model, [[bos]] * cfg.n_samples, SamplingConfig(max_new_tokens=max_len, batch_size=cfg.batch_size),
                     eos_id=eos, pad_id=pad, seed=cfg.seed, desc="sampling")
    finished = np.array([len(s) > 0 and s[-1] == eos for s in samples])
    metrics["samples"] = {
        **sample_metrics(_content(samples, eos)),
        "unfinished_frac": float(1.0 - finished.mean()),
    }
    metrics["reference"] = sample_metrics(_content(test_ids, eos))
    logp_model, _ = sequence_logps(model, [[bos, *s] for s in samples], pad_id=pad, batch_size=cfg.batch_size)
    records = [{"ids": s, "logp_model": float(lp)} for s, lp in zip(samples, logp_model.tolist())]
    sample_lens, data_lens = [len(s) for s in samples], [len(x) - 1 for x in test_ids]  # tokens after BOS
    metrics["length"] = length_report(sample_lens, data_lens, max_len=max(max_len, *data_lens), seed=cfg.seed)
    if oracle is not None:  # per sequence, ± SE; show it beside the length
        metrics["samples"].update(mean_estimate(np.asarray(oracle.reward(samples), dtype=np.float64)).to_dict("oracle_reward"))
    if language is not None:
        logp_data = language.log_prob(samples)
        metrics["exact"] = exact_metrics(logp_model.numpy(), logp_data, np.asarray(test_logp_data)[: len(test_ids)],
                                         logp_test.numpy(), n_tok.numpy(), sample_lengths=sample_lens)
        metrics["samples"].update(logp_per_token(samples, logp_data))
        for rec, lp in zip(records, logp_data.tolist()):
            rec["logp_data"] = lp if np.isfinite(lp) else None
    return metrics, records


def logp_per_token(samples: Sequence[Sequence[int]], logp_data: np.ndarray) -> dict:
    """log p_d per token over the possible samples (ratio Σ log p_d / Σ tokens, delta-method SE;
    empty when none is possible)."""
    out: dict = {}
    ok = np.isfinite(logp_data)
    if ok.any():
        lengths = np.array([len(s) for s, good in zip(samples, ok) if good], dtype=np.float64)
        out.update(ratio_estimate(logp_data[ok], lengths).to_dict("logp_data_per_token"))
    return out


def exact_metrics(logp_model_samples: np.ndarray, logp_data_samples: np.ndarray, logp_data_test: np.ndarray,
                  logp_model_test: np.ndarray, n_tok_test: np.ndarray, *,
                  sample_lengths: Sequence[int] | None = None) -> dict:
    """Forward KL on p_d's test samples; conditional reverse KL, impossible fraction and TVD on the
    model's samples (nats/sequence and, where lengths are known, nats/token)."""
    fkl = forward_kl(logp_data_test, logp_model_test)
    n_tok_test = np.asarray(n_tok_test, dtype=np.float64)
    lengths = None if sample_lengths is None else np.asarray(sample_lengths, dtype=np.float64)
    rkl = conditional_reverse_kl(logp_model_samples, logp_data_samples, lengths)
    tvd = total_variation(logp_model_samples, logp_data_samples)
    out = {
        **fkl.to_dict("forward_kl"),
        **ratio_estimate(logp_data_test - logp_model_test, n_tok_test).to_dict("forward_kl_per_token"),
        **rkl.to_dict(),
        **tvd.to_dict("tvd"),
        # −E_{p_d}[log p_d] per token on the test split: the entropy-rate floor of the test NLL.
        "data_entropy_rate": float(-logp_data_test.sum() / n_tok_test.sum()),
    }
    if lengths is not None:
        out.update(impossible_at_data_lengths(lengths, ~np.isfinite(logp_data_samples), n_tok_test))
    return out
