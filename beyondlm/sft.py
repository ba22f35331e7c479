"""Supervised fine-tuning: a causal LM trained with one token-level objective from the table.

Params section ``sft`` (``sft_config``): ``objectives.<variant>`` names a row of the SFT objective
table with its hyperparameters (and optional ``train`` overrides), ``model`` and ``train``.

Data: ``input_ids`` of the prepared train split (``[BOS] … [EOS]``); every position after BOS is
a target. The objective sees aligned ``(logits, labels, mask)``; the loop handles the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from beyondlm import distributed
from beyondlm.config import TRAIN_KEYS, ConfigError, ModelConfig, TrainConfig, load_section, record, train_config
from beyondlm.data.prepare import load_split, load_tokenizer
from beyondlm.logprobs import lm_targets, pad_batch, sequence_logps
from beyondlm.metrics import perplexity
from beyondlm.models import build_model, count_parameters, save_model
from beyondlm.objectives.sft import OBJECTIVES, resolve_objective, sft_token_loss
from beyondlm.training import heldout_loss, target_tokens, train_loop


# ----------------------------------------------------------------------------- the sft section
SFT_KEYS = ("variants", "seeds", "objectives", "model", "train")


@dataclass(frozen=True)
class SFTConfig:
    """One ``sft@<variant>-<seed>`` stage: the model, the loop and one objective."""

    variant: str
    objective: str
    hyperparams: Mapping[str, float]
    model: ModelConfig
    train: TrainConfig


def check_variant_name(variant: Any) -> None:
    """A variant name DVC can address: it becomes the params key ``sft.objectives.<variant>`` and
    part of a stage name. A dot would make DVC fail with "Parameters ... are missing"."""
    bad = next((c for c in ".@/:" if c in str(variant)), None)
    if bad:  # DVC reads `sft.objectives.<variant>` as a dotted path and `@`/`:` as addressing
        raise ConfigError(
            f"params.yaml: variant name '{variant}' contains '{bad}': DVC cannot address it; "
            f"use letters, digits, '-' and '_' (e.g. '{str(variant).replace(bad, '_')}')"
        )


def variant_objective(sft: Mapping[str, Any], variant: str) -> tuple[str, dict[str, float]]:
    """(objective name, validated hyperparameters) of ``sft.objectives.<variant>``; the entry's
    ``objective`` key defaults to the variant name. Shared by every stage with a variant axis."""
    entries = sft.get("objectives") or {}
    # All of sft.variants: the first stage of the matrix to run stops on a bad name, before DVC
    # reaches the bad variant's own stage (it only ever fails here; no output depends on the list).
    for name in [variant, *(sft.get("variants") or [])]:
        check_variant_name(name)
    if variant not in entries:
        raise ConfigError(
            f"params.yaml: sft.objectives has no entry '{variant}' (entries: "
            f"{', '.join(entries) or 'none'}); add it or drop it from the variants list"
        )
    entry = dict(entries[variant] or {})
    name = entry.pop("objective", variant)
    entry.pop("train", None)  # sft's per-variant training overrides: variant_train_overrides
    try:
        _, hyperparams = resolve_objective(name, entry)
    except ValueError as err:
        raise ConfigError(f"params.yaml: sft.objectives.{variant}: {err}") from err
    return name, hyperparams


def variant_train_overrides(sft: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """``sft.objectives.<variant>.train``: training keys this variant sets apart from ``sft.train``
    (e.g. a slower objective's step budget, so every variant trains to convergence)."""
    train = ((sft.get("objectives") or {}).get(variant) or {}).get("train") or {}
    if not isinstance(train, Mapping):
        raise ConfigError(f"params.yaml: sft.objectives.{variant}.train must be a mapping of training keys, "
                          f"got {train!r}")
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key 'sft.objectives.{variant}.train.{unknown[0]}'. "
                          f"Allowed: {', '.join(TRAIN_KEYS)}")
    return dict(train)


def sft_config(sft: Mapping[str, Any], variant: str, seed: int) -> SFTConfig:
    """The config of stage ``sft@<variant>-<seed>``: ``sft.objectives[variant]`` names the
    objective and its hyperparameters; ``sft.train`` holds the training keys, and the entry's
    optional ``train`` mapping overrides them for this variant."""
    unknown = sorted(set(sft) - set(SFT_KEYS))
    if unknown:
        moved = f" (training keys moved under 'sft.train': sft.train.{unknown[0]})" if unknown[0] in TRAIN_KEYS else ""
        raise ConfigError(f"params.yaml: unknown key 'sft.{unknown[0]}'{moved}. Allowed: {', '.join(SFT_KEYS)}")
    objective, hyperparams = variant_objective(sft, variant)
    train = train_config(sft.get("train"), variant_train_overrides(sft, variant), "sft.train", seed=seed)
    model = load_section(ModelConfig, sft.get("model"), "sft.model")
    return SFTConfig(variant=variant, objective=objective, hyperparams=hyperparams, model=model, train=train)


# ----------------------------------------------------------------------------- training
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


def run_sft(cfg: SFTConfig, data_dir: Path, *, out_dir: Path, ckpt_dir: Path, live_dir: Path) -> dict | None:
    """Train, save the model to ``out_dir`` (safetensors), return metrics for the JSON. Under
    torchrun (``train.processes`` > 1) every rank trains; only rank 0 saves and evaluates, the
    others return None."""
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
    fingerprint = {"cfg": record(cfg), "train": file_digest(data_dir / "train.parquet")}
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
    if not distributed.is_main():
        return None
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
