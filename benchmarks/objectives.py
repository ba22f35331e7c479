"""Per-step cost of each SFT objective relative to MLE (issue targets: ≤ 1.1×, EMO ≤ 1.3×).

One process, one model, one fixed batch; each objective's full training step (forward,
objective, backward, AdamW) is timed in interleaved rounds so machine-load drift hits all alike,
and the median per-step time is reported with its ratio to MLE.
"""

from __future__ import annotations

import time
from statistics import median

import numpy as np
import torch

from beyondlm.config import ModelConfig, TrainConfig
from beyondlm.sft import SFTConfig
from beyondlm.data import tokenization
from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
from beyondlm.logprobs import pad_batch
from beyondlm.models import build_model
from beyondlm.objectives.sft import OBJECTIVES
from beyondlm.sft import make_loss_fn


def objective_overheads(model_cfg: ModelConfig, batch_size: int = 64, rounds: int = 7, steps: int = 5) -> dict:
    language = SyntheticLanguage.build(LanguageSpec())
    tok = tokenization.word_tokenizer(language.vocab)
    seqs = [[tok.bos_token_id, *s] for s in language.sample(batch_size, np.random.default_rng(0))]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(0)
    model = build_model(model_cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = {name: make_loss_fn(SFTConfig(name, name, dict(obj.defaults), model_cfg, TrainConfig()))
              for name, obj in OBJECTIVES.items()}
    times: dict[str, list[float]] = {name: [] for name in losses}

    def step(loss_fn):
        loss, n = loss_fn(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for loss_fn in losses.values():  # warm-up: allocator, kernel selection
        step(loss_fn)
    for _ in range(rounds):
        for name, loss_fn in losses.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(loss_fn)
            times[name].append((time.perf_counter() - t0) / steps)
    base = median(times["mle"])
    return {name: {"step_s": median(t), "ratio_to_mle": median(t) / base} for name, t in times.items()}
