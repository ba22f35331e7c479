"""Evaluate a causal LM: test perplexity, sample metrics, and on the synthetic language the exact
distributional metrics against the known p_d.

Estimators (Monte Carlo, each with a standard error; see ``beyondlm.metrics.distributional``):
- forward KL(p_d‖p_θ) = E_{x∼p_d}[log p_d(x) − log p_θ(x)] over the test split (drawn from p_d);
- reverse KL(p_θ‖p_d) = E_{x∼p_θ}[log p_θ(x) − log p_d(x)] over the model's own samples, pure
  ancestral sampling at T = 1 (so they are draws from p_θ itself), scored by the exact log p_d.
  Samples p_d cannot produce (log p_d = −∞: an ungrammatical transition, or no EOS within the
  language's max length) make the true value infinite; we report the estimate over the possible
  samples and ``impossible_frac`` separately — the purest quality failure;
- TVD = E_{x∼p_θ}[max(0, 1 − p_d(x)/p_θ(x))] on the same samples (impossible ones count 1).
Sequence log-probs cover every token after BOS, EOS included.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from beyondlm.config import EvaluateConfig
from beyondlm.data.synthetic import SyntheticLanguage
from beyondlm.logprobs import sequence_logps
from beyondlm.metrics import forward_kl, perplexity, reverse_kl, sample_metrics, total_variation
from beyondlm.sampling import SamplingConfig, sample


def _content(seqs: Sequence[Sequence[int]], eos_id: int) -> list[list[int]]:
    """Tokens without BOS/EOS, for surface text metrics."""
    return [[t for t in s if t != eos_id] for s in seqs]


def evaluate_lm(model, tokenizer, test_ids: Sequence[Sequence[int]], cfg: EvaluateConfig, *,
                max_len: int, language: SyntheticLanguage | None = None,
                test_logp_data: Sequence[float] | None = None) -> tuple[dict, list[dict]]:
    """Metrics dict and one record per model sample: ``ids`` (without BOS), ``logp_model`` and,
    on the synthetic language, ``logp_data`` (None where p_d(x) = 0)."""
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
    if language is not None:
        logp_data = language.log_prob(samples)
        metrics["exact"] = exact_metrics(logp_model.numpy(), logp_data, np.asarray(test_logp_data)[: len(test_ids)],
                                         logp_test.numpy(), n_tok.numpy())
        metrics["samples"]["oracle_reward"] = float(np.mean(language.oracle_reward(samples)))
        for rec, lp in zip(records, logp_data.tolist()):
            rec["logp_data"] = lp if np.isfinite(lp) else None
    return metrics, records


def exact_metrics(logp_model_samples: np.ndarray, logp_data_samples: np.ndarray, logp_data_test: np.ndarray,
                  logp_model_test: np.ndarray, n_tok_test: np.ndarray) -> dict:
    """Forward KL on p_d's test samples; reverse KL and TVD on the model's samples (nats/sequence)."""
    fkl = forward_kl(logp_data_test, logp_model_test)
    rkl, impossible = reverse_kl(logp_model_samples, logp_data_samples)
    tvd = total_variation(logp_model_samples, logp_data_samples)
    out = {
        **fkl.to_dict("forward_kl"),
        "forward_kl_per_token": fkl.mean / float(n_tok_test.mean()),
        "impossible_frac": impossible,
        **tvd.to_dict("tvd"),
        # −E_{p_d}[log p_d] per token on the test split: the entropy-rate floor of the test NLL.
        "data_entropy_rate": float(-logp_data_test.sum() / n_tok_test.sum()),
    }
    if rkl is not None:
        out.update(rkl.to_dict("reverse_kl"))
    return out
