"""Bradley–Terry reward model: a sequence classifier with one scalar output, trained on pairs.

The model reads a whole sequence (prompt + completion, ``[BOS] x_1 .. x_n``) and returns the scalar
head at its last real token. Pair batches are ``[chosen; rejected]`` on dim 0, as everywhere.
It plugs into the shared loop (`beyondlm.training.train_loop`) as
``reward_loss_fn(model, batch) -> (Σ pair losses, n pairs)`` with `pair_collate`.

Pooling trap: HF's ``*ForSequenceClassification`` pools the last position whose id differs from
``config.pad_token_id`` (it ignores ``attention_mask``). Our tokenizers use one id for BOS, EOS
and pad, so with stock settings the pooled token would be the one *before* the final EOS, and a
truncated text would score the same as the completed one. `build_reward_model` therefore gives
the model a dedicated pad id (one extra embedding row) and `rewards` writes that id into every
padded position before the forward pass.

BT is invariant to adding a constant to every reward, so rewards are identified only up to a
shift, and parameters that only shift all rewards (GPT-2's final LayerNorm bias, feeding the
bias-free head) get zero gradient. Reward centering (Eisenstein et al. 2023; TRL's
``center_rewards_coefficient``) would pin the shift; it is not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from beyondlm.config import ModelConfig
from beyondlm.logprobs import pad_batch
from beyondlm.models import check_vocabulary, from_pretrained, tiny_gpt2_config


def build_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """GPT-2 (or ``cfg.name_or_path``) with a scalar head (num_labels = 1) and a dedicated pad id."""
    if cfg.name_or_path:
        check_vocabulary(tokenizer, cfg.name_or_path, "reward.model.name_or_path", cfg.trust_remote_code)
        model = from_pretrained(AutoModelForSequenceClassification, cfg.name_or_path, num_labels=1,
                                trust_remote_code=cfg.trust_remote_code, fix="set reward.model.name_or_path to a model directory or hub id")
        n_rows = max(model.get_input_embeddings().num_embeddings, len(tokenizer))
        pad = model.config.pad_token_id
        if pad is None or pad in (tokenizer.eos_token_id, tokenizer.bos_token_id) or pad >= n_rows:
            model.resize_token_embeddings(n_rows + 1)  # new row n_rows: pad only, never a real token
            model.config.pad_token_id = n_rows
        return model
    # + one embedding row used only as pad (see the module docstring)
    config = tiny_gpt2_config(cfg, tokenizer, vocab_size=len(tokenizer) + 1, pad_token_id=len(tokenizer),
                              num_labels=1)
    return GPT2ForSequenceClassification(config)


def rewards(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """r(x) at the last attended token, float32: input_ids, attention_mask (N, T) -> (N,).

    Padded positions get the model's dedicated pad id so HF's pooling lands on the last real token.
    """
    pad = model.config.pad_token_id
    keep = attention_mask.bool()
    if (input_ids[keep] == pad).any():
        raise ValueError(f"a real token equals the reward model's pad id {pad}; build it with build_reward_model")
    ids = input_ids.masked_fill(~keep, pad)
    return model(input_ids=ids, attention_mask=attention_mask).logits.squeeze(-1).float()  # (N,)


def bt_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Bradley–Terry pair loss (Bradley & Terry 1952; Ouyang et al., "Training language models to
    follow instructions with human feedback", NeurIPS 2022, eq. 1 without the 1/C(K,2) factor):
        ℓ = −log σ(r(x, y_w) − r(x, y_l)).
    Inputs (B,); returns (B,)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())


def reward_loss_fn(model: PreTrainedModel, batch) -> tuple[Tensor, int]:
    """Shared-loop contract: batch {input_ids, attention_mask} (2B, T) as [chosen; rejected] on
    dim 0 -> (Σ_b bt_loss, B): the loop divides by the step's total number of pairs."""
    r = rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    r_chosen, r_rejected = r.chunk(2)  # (B,), (B,)
    return bt_loss(r_chosen, r_rejected).sum(), r_chosen.shape[0]


@dataclass(frozen=True)
class Pair:
    """One training example: token ids of the chosen and the rejected sequence (prompt included).

    ``len`` is the longer of the two, so the loop's ``group_by_length`` groups pairs sensibly."""

    chosen: Sequence[int]
    rejected: Sequence[int]

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def pair_collate(pad_id: int):
    """collate(list[Pair]) -> {input_ids, attention_mask} (2B, T), [chosen; rejected] on dim 0."""

    def collate(pairs: Sequence[Pair]) -> dict[str, Tensor]:
        ids, mask = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


@torch.no_grad()
def score(model: PreTrainedModel, seqs: Sequence[Sequence[int]], *, pad_id: int,
          batch_size: int = 256) -> np.ndarray:
    """r(x) for each token list, in input order: (N,) float64. Length-sorted batches, eval mode
    (the model's train/eval mode is restored afterwards)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.empty(len(seqs), dtype=np.float64)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            ids, attn = pad_batch([seqs[i] for i in idx], pad_id, device)
            out[idx] = rewards(model, ids, attn).double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def pair_accuracy(model: PreTrainedModel, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                  *, pad_id: int, batch_size: int = 256) -> float:
    """Fraction of pairs with r(chosen) > r(rejected) (ties count as wrong)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"chosen has {len(chosen)} sequences but rejected has {len(rejected)}")
    r_w = score(model, chosen, pad_id=pad_id, batch_size=batch_size)
    r_l = score(model, rejected, pad_id=pad_id, batch_size=batch_size)
    return float(np.mean(r_w > r_l))
