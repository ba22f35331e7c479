"""SIR decoding cost relative to plain sampling of the same N·M candidates (target ≤ 1.2×).

    python -m benchmarks.sir --side sampling|sir --seed R     (one timed measurement, one JSON line)

Both draw N·M continuations in one batched `sample` call from the same model (the default
`sft.model`, untrained) and prompts; SIR additionally computes the evaluation functions (an LM
scoring pass for `nll`, hidden states for `coherence`) and resamples. Each measurement runs in a
fresh process after one untimed warm-up call of the same side, and the two sides alternate
(`sir_overhead`), with the load average recorded around each, so drifting load on the shared
machine hits both alike. Reported: generated tokens per second of each, their ratio (of medians)
and each pair's own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median

import numpy as np
import torch

FEATURES = ["tr32", "div", "length", "nll", "coherence"]
N_PROMPTS, M = 64, 8


def measure(side: str, seed: int) -> dict:
    from beyondlm.config import ModelConfig, load_section, read_params, section
    from beyondlm.data import tokenization
    from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
    from beyondlm.ebm.sir import sir_decode
    from beyondlm.models import build_model
    from beyondlm.sampling import SamplingConfig, sample

    load_before = os.getloadavg()
    model_cfg = load_section(ModelConfig, section(read_params("params.yaml"), "sft").get("model"), "sft.model")
    language = SyntheticLanguage.build(LanguageSpec())
    tok = tokenization.word_tokenizer(language.vocab)
    prompts = [[tok.bos_token_id, *s[:8]] for s in language.sample(N_PROMPTS, np.random.default_rng(0))]
    torch.manual_seed(0)
    model = build_model(model_cfg, tok).eval()
    cfg = SamplingConfig(max_new_tokens=56, batch_size=1024)
    mu = np.full(len(FEATURES), 0.1)
    ids = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)

    def run(r: int):
        if side == "sampling":
            return sample(model, [p for p in prompts for _ in range(M)], cfg, seed=r, **ids)
        return sir_decode(model, prompts, mu, FEATURES, M, cfg, seed=r, batch_size=1024, **ids)

    run(seed + 1000)  # untimed warm-up of this side
    t0 = time.perf_counter()
    run(seed)
    wall = time.perf_counter() - t0
    # the candidates both sides draw: the same sample call with the same seed
    tokens = sum(len(c) for c in sample(model, [p for p in prompts for _ in range(M)], cfg, seed=seed, **ids))
    return {"side": side, "seed": seed, "wall_s": wall, "candidate_tokens": tokens,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def sir_overhead(repeats: int = 3) -> dict:
    """Interleaved fresh-process measurements of both sides; the SIR/sampling time ratio."""
    from benchmarks.run import fresh

    runs: dict[str, list[dict]] = {"sampling": [], "sir": []}
    for r in range(repeats):
        for side in (("sampling", "sir") if r % 2 == 0 else ("sir", "sampling")):
            runs[side].append(fresh("benchmarks.sir", "--side", side, "--seed", str(r)))
    s, q = (median(x["wall_s"] for x in runs[k]) for k in ("sampling", "sir"))
    tokens = median(x["candidate_tokens"] for x in runs["sampling"])
    loads = [x for rs in runs.values() for m in rs for x in (m["load_average_before"][0], m["load_average_after"][0])]
    return {"n_prompts": N_PROMPTS, "M": M, "features": FEATURES, "candidate_tokens": tokens,
            "sampling_tokens_per_s": tokens / s, "sir_tokens_per_s": tokens / q, "sir_over_sampling": q / s,
            "pair_ratios": [b["wall_s"] / a["wall_s"] for a, b in zip(runs["sampling"], runs["sir"])],
            "target_ratio": 1.2, "load_average_1min": {"min": min(loads), "max": max(loads)},
            "threads": torch.get_num_threads(), "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=("sampling", "sir"), required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(measure(args.side, args.seed)))


if __name__ == "__main__":
    main()
