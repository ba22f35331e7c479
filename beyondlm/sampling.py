"""Batched sampling from causal LMs through ``transformers``' ``generate``.

Completions are returned without their prompt; a completion that reached ``max_new_tokens``
before EOS is returned as is (it has no EOS: callers treat it as unfinished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding knobs. The defaults are pure ancestral sampling: draws from p_θ itself."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0
    batch_size: int = 256


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _strip(row: list[int], eos_id: int) -> list[int]:
    """Cut after the first EOS (generate pads finished rows with pad = EOS)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
    seed: int,
    desc: str | None = None,
) -> list[list[int]]:
    """One completion per prompt (repeat prompts for several). Seeded: same seed → same samples."""
    device = next(model.parameters()).device
    gen = GenerationConfig(
        do_sample=True,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model.eval()
    out: list[list[int]] = []
    starts = range(0, len(prompts), cfg.batch_size)
    for lo in tqdm(starts, desc=desc, disable=desc is None, mininterval=2.0):
        batch = prompts[lo : lo + cfg.batch_size]
        ids, mask = _left_pad(batch, pad_id, device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for row in seqs[:, ids.shape[1] :].tolist():  # (B, new tokens)
            out.append(_strip(row, eos_id))
    return out
