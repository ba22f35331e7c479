"""Batched sampling from causal LMs through ``transformers``' ``generate``.

Completions are returned without their prompt; a completion that reached ``max_new_tokens``
before EOS is returned as is (it has no EOS: callers treat it as unfinished).

``sample_scored`` also returns what the sampler computed anyway: log p_θ(completion | prompt)
from the raw logits of every step, and optionally the mean final hidden states of the prompt and
of the completion, so that scoring the samples needs no second forward pass (SIR decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from beyondlm.logprobs import masked_mean, token_logps


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


def _generation_config(cfg: SamplingConfig, eos_id: int, pad_id: int, **extra) -> GenerationConfig:
    return GenerationConfig(
        **extra,
        do_sample=True,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _batches(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, pad_id: int, seed: int,
             desc: str | None):
    """Seed the draws, put the model in eval mode, then yield left-padded prompt batches (ids, mask)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.eval()
    for lo in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, disable=desc is None, mininterval=2.0):
        yield _left_pad(prompts[lo : lo + cfg.batch_size], pad_id, device)


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
    gen = _generation_config(cfg, eos_id, pad_id)
    out: list[list[int]] = []
    for ids, mask in _batches(model, prompts, cfg, pad_id=pad_id, seed=seed, desc=desc):
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        out += [_strip(row, eos_id) for row in seqs[:, ids.shape[1] :].tolist()]  # (B, new tokens)
    return out


@dataclass(frozen=True)
class SampleScores:
    """Read off the sampling pass itself, one row per completion.

    ``logps``: log p_θ(completion | prompt), EOS included, from the model's RAW logits — the
    model's own probability whatever temperature or truncation drew the sample.
    ``prompt_states`` / ``completion_states``: mean final hidden state (B, H) over the prompt's
    tokens and over the completion's tokens (EOS excluded; zeros when empty), the completion read
    in the context of its prompt — what one causal forward pass over prompt + completion gives.
    """

    logps: np.ndarray
    prompt_states: np.ndarray | None = None
    completion_states: np.ndarray | None = None


@torch.no_grad()
def _scored_batch(model, ids, mask, gen: GenerationConfig, *, eos_id: int):
    states = gen.output_hidden_states
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    new = out.sequences[:, ids.shape[1] :]  # (B, S)
    rows = [_strip(r, eos_id) for r in new.tolist()]
    n = torch.tensor([len(r) for r in rows], device=new.device)  # (B,) scored tokens, EOS included
    steps = torch.arange(new.shape[1], device=new.device)
    lp = token_logps(torch.stack(out.logits, 1), new)  # (B, S) log p_θ(y_t | x, y_<t)
    logps = torch.where(steps < n[:, None], lp, 0.0).double().sum(1).cpu().numpy()
    if not states:
        return rows, SampleScores(logps)
    # hidden_states[0][-1]: final layer over the prompt (B, P, H); step s ≥ 1 holds the state of
    # input y_{s−1}. The last token's own state is never computed by generate: one more cached
    # step supplies it (needed only for completions that ran to max_new_tokens without EOS).
    final = [h[-1] for h in out.hidden_states]
    full_mask = torch.cat([mask, mask.new_ones(new.shape)], 1)  # (B, P + S): cache + y_{S−1}
    extra = model(input_ids=new[:, -1:], past_key_values=out.past_key_values, attention_mask=full_mask,
                  position_ids=full_mask.sum(1, keepdim=True) - 1,  # as generate numbers them
                  output_hidden_states=True).hidden_states[-1]  # (B, 1, H)
    gen_states = torch.cat([*final[1:], extra], 1)  # (B, S, H): state of y_0 .. y_{S−1}
    body = n - torch.tensor([int(bool(r) and r[-1] == eos_id) for r in rows], device=n.device)
    prompt_mean = masked_mean(final[0], mask.bool())
    completion_mean = masked_mean(gen_states, steps < body[:, None])
    return rows, SampleScores(logps, prompt_mean.cpu().numpy(), completion_mean.cpu().numpy())


@torch.no_grad()
def sample_scored(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
    seed: int,
    states: bool = False,
    desc: str | None = None,
) -> tuple[list[list[int]], SampleScores]:
    """``sample`` (the same draws for the same seed) plus the scores it read off on the way.

    Memory: the step logits of a batch are kept until it ends, batch_size × max_new_tokens × V
    floats (117 MB for 1024 × 56 × 512)."""
    gen = _generation_config(cfg, eos_id, pad_id, return_dict_in_generate=True, output_logits=True,
                             output_hidden_states=states)
    rows: list[list[int]] = []
    parts: list[SampleScores] = []
    for ids, mask in _batches(model, prompts, cfg, pad_id=pad_id, seed=seed, desc=desc):
        batch_rows, scores = _scored_batch(model, ids, mask, gen, eos_id=eos_id)
        rows += batch_rows
        parts.append(scores)
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts]) if states else None  # noqa: E731
    return rows, SampleScores(np.concatenate([p.logps for p in parts]), cat("prompt_states"),
                              cat("completion_states"))
