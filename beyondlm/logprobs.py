"""Per-token and per-sequence log-probabilities: the one place they are computed.

Convention: a sequence is ``[BOS] x_1 .. x_n`` (``x_n`` = EOS when complete); the LM scores
positions ``1..n`` given their prefixes. ``start`` marks the first scored position per row (1 for
whole texts, the prompt length for completions), so prompt tokens are masked out.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[label] in float32. logits (B, T, V), labels (B, T) → (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def lm_targets(input_ids: Tensor, attention_mask: Tensor, start: Tensor | None = None):
    """Shift for next-token prediction: logits[:, :-1] predict ``labels``; ``mask`` (B, T-1) is 1
    on scored positions (inside the text, at or after ``start``)."""
    labels = input_ids[:, 1:]
    mask = attention_mask[:, 1:].bool()
    if start is not None:
        positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)  # (T-1,)
        mask = mask & (positions.unsqueeze(0) >= start.unsqueeze(1))
    return labels, mask


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Right-pad token lists → ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is true, (B, T, H) → (B, H) float64; zeros for empty rows.
    ``where`` rather than a product: states of padded positions may be NaN under SDPA."""
    m = mask.unsqueeze(-1)
    total = torch.where(m, hidden.double(), 0.0).sum(1)
    return total / m.sum(1).clamp(min=1)


def batch_token_logps(model, input_ids: Tensor, attention_mask: Tensor, start: Tensor | None = None,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """log p(x_t | x_<t) per position, WITH gradients: ``(logps (B, T-1) float32, mask (B, T-1) bool)``.

    Position t−1 scores token t (``lm_targets``); ``logps`` is 0 where ``mask`` is false (prompt,
    padding), so a row sum is its sequence log-prob. Rows are right-padded ``[BOS] prompt
    completion``; ``start`` (B,) is the first scored position (the prompt length), ``None`` scores
    every token after BOS."""
    labels, mask = lm_targets(input_ids, attention_mask, start)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    return token_logps(logits, labels, temperature) * mask, mask


def batch_sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, start: Tensor | None = None,
                         temperature: float = 1.0) -> Tensor:
    """Σ_t log p(x_t | x_<t) over each row's scored positions, (B,) float32, WITH gradients
    (``batch_token_logps`` summed over positions)."""
    return batch_token_logps(model, input_ids, attention_mask, start, temperature)[0].sum(-1)


@torch.no_grad()
def sequence_logps(
    model,
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    starts: Sequence[int] | None = None,
    batch_size: int = 256,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Σ_t log p(x_t | x_<t) per sequence over scored positions, and the number of scored tokens.

    Returns ``(logps (N,) float64, n_tokens (N,) long)``, in the input order. Batches are formed
    from length-sorted rows so padding stays small.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out_logp = torch.empty(len(seqs), dtype=torch.float64)
    out_n = torch.empty(len(seqs), dtype=torch.long)
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        ids, attn = pad_batch([seqs[i] for i in idx], pad_id, device)
        start = torch.tensor([starts[i] if starts else 1 for i in idx], device=device)
        out_logp[idx] = batch_sequence_logps(model, ids, attn, start, temperature).double().cpu()
        out_n[idx] = lm_targets(ids, attn, start)[1].sum(-1).cpu()
    return out_logp, out_n
