"""SIR decoding cost relative to plain sampling of the same N·M candidates (target ≤ 1.2×).

Both draw N·M continuations in one batched `sample` call from the same model and prompts; SIR
additionally computes the evaluation functions (an LM scoring pass for `nll`, hidden states for
`coherence`) and resamples. Reported: generated tokens per second of each, and their ratio.
"""

from __future__ import annotations

import time
from statistics import median

import numpy as np
import torch

from beyondlm.config import ModelConfig
from beyondlm.data import tokenization
from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
from beyondlm.ebm.sir import sir_decode
from beyondlm.models import build_model
from beyondlm.sampling import SamplingConfig, sample

FEATURES = ["tr32", "div", "length", "nll", "coherence"]


def sir_overhead(model_cfg: ModelConfig, n_prompts: int = 64, M: int = 8, rounds: int = 3) -> dict:
    language = SyntheticLanguage.build(LanguageSpec())
    tok = tokenization.word_tokenizer(language.vocab)
    prompts = [[tok.bos_token_id, *s[:8]] for s in language.sample(n_prompts, np.random.default_rng(0))]
    torch.manual_seed(0)
    model = build_model(model_cfg, tok).eval()
    cfg = SamplingConfig(max_new_tokens=56, batch_size=1024)
    mu = np.full(len(FEATURES), 0.1)
    ids = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    times: dict[str, list[float]] = {"sampling": [], "sir": []}
    tokens = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        cands = sample(model, [p for p in prompts for _ in range(M)], cfg, seed=r, **ids)
        times["sampling"].append(time.perf_counter() - t0)
        tokens = sum(len(c) for c in cands)
        t0 = time.perf_counter()
        sir_decode(model, prompts, mu, FEATURES, M, cfg, seed=r, batch_size=1024, **ids)
        times["sir"].append(time.perf_counter() - t0)
    s, q = median(times["sampling"]), median(times["sir"])
    return {"n_prompts": n_prompts, "M": M, "features": FEATURES, "candidate_tokens": tokens,
            "sampling_tokens_per_s": tokens / s, "sir_tokens_per_s": tokens / q, "sir_over_sampling": q / s}
