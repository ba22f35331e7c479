"""Supervised fine-tuning: a causal LM trained with one token-level objective from the table.

Data: ``input_ids`` of the prepared train split (``[BOS] … [EOS]``); every position after BOS is
a target. The objective sees aligned ``(logits, labels, mask)``; the loop handles the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from beyondlm.config import ConfigError, SFTConfig
from beyondlm.data.prepare import load_split, load_tokenizer
from beyondlm.logprobs import lm_targets, pad_batch, sequence_logps
from beyondlm.metrics import perplexity
from beyondlm.models import build_model, count_parameters, save_model
from beyondlm.objectives import OBJECTIVES, sft_token_loss
from beyondlm.training import heldout_loss, target_tokens, train_loop


def file_digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_loss_fn(cfg: SFTConfig):
    """``loss_fn(model, batch) -> (Σ token losses, n tokens)`` for the configured objective."""
    objective = OBJECTIVES[cfg.objective]

    def loss_fn(model, batch):
        labels, mask = lm_targets(batch["input_ids"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # The EMO cost uses the output embedding, detached inside the objective.
        embedding = model.get_output_embeddings().weight if objective.needs_embedding else None
        per_token = sft_token_loss(cfg.objective, logits[:, :-1], labels, mask, cfg.hyperparams, embedding)
        return per_token.sum(), mask.sum()

    return loss_fn


def run_sft(cfg: SFTConfig, data_dir: Path, *, out_dir: Path, ckpt_dir: Path, live_dir: Path) -> dict:
    """Train, save the model to ``out_dir`` (safetensors), return metrics for the JSON."""
    tokenizer = load_tokenizer(data_dir)
    train = load_split(data_dir, "train")["input_ids"]
    valid = load_split(data_dir, "valid")["input_ids"]
    longest = max(len(x) for x in train)
    if not cfg.model.name_or_path and longest > cfg.model.n_positions:
        raise ConfigError(
            f"params.yaml: sft.model.n_positions={cfg.model.n_positions} is shorter than the "
            f"longest training sequence ({longest} tokens incl. BOS); raise it to >= {longest}"
        )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer)
    fingerprint = {"cfg": asdict(cfg), "train": file_digest(data_dir / "train.parquet")}
    pad_id = tokenizer.pad_token_id

    def collate(rows):
        ids, mask = pad_batch(rows, pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    loss_fn = make_loss_fn(cfg)
    model, result = train_loop(
        model, train, loss_fn, cfg.train, collate=collate, units=target_tokens(train),
        validate=heldout_loss(loss_fn, valid, collate), ckpt_dir=ckpt_dir, live_dir=live_dir,
        fingerprint=fingerprint, desc=f"sft {cfg.variant} s{cfg.train.seed}",
    )
    save_model(model, tokenizer, out_dir)
    model.eval()
    logp, n_tok = sequence_logps(model, valid, pad_id=pad_id)
    return {
        "objective": cfg.objective,
        "hyperparams": dict(cfg.hyperparams),
        "seed": cfg.train.seed,
        "n_params": count_parameters(model),
        "converged": result.convergence["converged"],
        "convergence": result.convergence,
        "train": asdict(result),
        "valid": {
            "nll_per_token": float(-logp.sum() / n_tok.sum()),
            "perplexity": perplexity(float(-logp.sum()), int(n_tok.sum())),
        },
    }
