"""MixCE's synthetic experiment: train a tiny GPT-2 on samples of a random bigram gold LM with one
objective of the SFT table, then compare its transition rows to the gold rows exactly.

Config: params section ``bigram`` (`BigramConfig`) plus the variant's entry ``sft.objectives.<v>``,
so the same variants (mle, mixce with its η, ...) run here and in the SFT stage. The data depend
only on ``bigram.language`` (train samples seeded by [language.seed, 0], test by
[language.seed, 1]), so every variant and seed sees the same texts; the stage seed drives the model
init and the batch order.

Test metrics on ``n_test`` held-out gold samples x_i (BOS prepended for the model, EOS counted):
- nll_per_token = −Σ log p_θ(x_i) / Σ |x_i|; entropy_rate = −Σ log p_d(x_i) / Σ |x_i| (same texts,
  the floor no model can beat; delta-method se);
- forward KL per sequence = mean_i[log p_d(x_i) − log p_θ(x_i)] ± se (unbiased Monte Carlo,
  `beyondlm.metrics.forward_kl`); per token = nll_per_token − entropy_rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch

from beyondlm.config import ConfigError, ModelConfig, TrainConfig, load_section
from beyondlm.sft import SFTConfig
from beyondlm.data.bigram import BigramLM, BigramSpec, empirical_rows, jensen_shannon, transition_metrics
from beyondlm.data.tokenization import word_tokenizer
from beyondlm.logprobs import pad_batch, sequence_logps
from beyondlm.metrics import forward_kl
from beyondlm.models import build_model, count_parameters
from beyondlm.sft import make_loss_fn
from beyondlm.training import heldout_loss, target_tokens, train_loop


@dataclass(frozen=True)
class BigramConfig:
    """Params section ``bigram``: the gold language, data sizes, ``model`` and ``train``."""

    variants: list[str] = field(default_factory=lambda: ["mle"])  # matrix axis (entries of sft.objectives)
    seeds: list[int] = field(default_factory=lambda: [0])  # matrix axis
    language: BigramSpec = field(default_factory=BigramSpec)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=80))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, batch_size=32, lr=3e-3,
                                                                    warmup_steps=30, ckpt_every=0))
    n_train: int = 5000  # gold samples to train on
    n_test: int = 500  # held-out gold samples for NLL and forward KL; held-out evaluations use as many

    def __post_init__(self) -> None:
        for key, lo in (("n_train", 1), ("n_test", 2)):
            value = getattr(self, key)
            if not lo <= value <= 10**8:
                raise ConfigError(f"params.yaml: 'bigram.{key}'={value!r} must be between {lo} and 10**8")
        if self.model.name_or_path:
            raise ConfigError("params.yaml: bigram.model.name_or_path must be null: the vocabulary is the gold "
                              "LM's own, so only a fresh tiny GPT-2 fits")
        need = self.language.max_len + 1  # BOS + up to max_len tokens
        if self.model.n_positions < need:
            raise ConfigError(
                f"params.yaml: bigram.model.n_positions={self.model.n_positions} is shorter than "
                f"BOS + bigram.language.max_len={self.language.max_len}; raise it to >= {need}"
            )


def bigram_config(raw: Mapping[str, Any]) -> BigramConfig:
    """Strictly load params section ``bigram`` (unknown keys and bad values → ConfigError)."""
    return load_section(BigramConfig, raw, "bigram")


def gold_data(spec: BigramSpec, n_train: int, n_test: int) -> tuple[BigramLM, list, list, list]:
    """The gold LM and its train/valid/test samples (no BOS; valid has ``n_test`` texts), seeded
    by the language seed only."""
    lm = BigramLM.build(spec)
    train = lm.sample(n_train, np.random.default_rng([spec.seed, 0]))
    test = lm.sample(n_test, np.random.default_rng([spec.seed, 1]))
    valid = lm.sample(n_test, np.random.default_rng([spec.seed, 2]))
    return lm, train, valid, test


def run_bigram(cfg: BigramConfig, variant: str, objective: str, hyperparams: Mapping[str, float],
               seed: int) -> dict:
    """Train on gold samples with one objective; return the metrics for the stage's JSON."""
    lm, train, valid, test = gold_data(cfg.language, cfg.n_train, cfg.n_test)
    tok = word_tokenizer(lm.vocab)
    sft = SFTConfig(variant=variant, objective=objective, hyperparams=dict(hyperparams),
                    model=cfg.model, train=replace(cfg.train, seed=seed))
    torch.manual_seed(seed)
    model = build_model(sft.model, tok)
    bos = tok.bos_token_id  # = EOS_ID = 0

    def collate(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    train_ids, loss_fn = [[bos, *x] for x in train], make_loss_fn(sft)
    model, result = train_loop(model, train_ids, loss_fn, sft.train, collate=collate,
                               units=target_tokens(train_ids),
                               validate=heldout_loss(loss_fn, [[bos, *x] for x in valid], collate),
                               desc=f"bigram {variant} s{seed}")
    model.eval()
    emp, unseen = empirical_rows(lm, [[bos, *x] for x in train])
    return {
        "objective": objective,
        "hyperparams": dict(hyperparams),
        "seed": seed,
        "n_params": count_parameters(model),
        "converged": result.convergence["converged"],
        "convergence": result.convergence,
        "train": asdict(result),
        "transition": transition_metrics(model, lm, batch_size=256),
        "test": _test_metrics(model, lm, test, pad_id=tok.pad_token_id),
        # What counting bigrams in the same training texts achieves: the finite-data reference.
        "train_counts": {"js_mean": float(jensen_shannon(emp, lm.word_rows).mean()),
                         "unseen_rows": unseen},
    }


def _test_metrics(model, lm: BigramLM, test: list, *, pad_id: int) -> dict[str, float]:
    logp_model, n_tok = sequence_logps(model, [[lm.EOS_ID, *x] for x in test], pad_id=pad_id)
    logp_model = logp_model.numpy()
    logp_gold = lm.log_prob(test)
    n_tokens = float(n_tok.sum())
    entropy, entropy_se = lm.entropy_rate(test)
    nll = float(-logp_model.sum() / n_tokens)
    return {
        "nll_per_token": nll,
        "entropy_rate": entropy,
        "entropy_rate_se": entropy_se,
        "excess_nll_per_token": nll - entropy,
        **forward_kl(logp_gold, logp_model).to_dict("forward_kl_per_seq"),
        "mean_length": n_tokens / len(test),
    }
