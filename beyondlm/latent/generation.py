"""Generation from the latent-plan LM: codes z ~ p(z) from the prior, then text x ~ p(x | z).

Both steps are pure ancestral sampling (T = 1, no truncation), so the texts are draws from the
model's own marginal p(x) = Σ_z p(z) p(x|z) and the exact log p_d of the synthetic language
scores them like any other model's samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from beyondlm.latent.model import LatentPlanLM, length_mask
from beyondlm.sampling import SamplingConfig, sample


def sample_plans(prior, n: int, *, n_codes: int, max_codes: int, seed: int,
                 batch_size: int = 256) -> list[list[int]]:
    """n code sequences from the prior (``generate`` through ``beyondlm.sampling.sample``).

    The prior's BOS = EOS = K; a plan is cut before its EOS, or has ``max_codes`` codes if none
    came (the longest training plan has that many, so the prior is trained to stop there).
    """
    cfg = SamplingConfig(max_new_tokens=max_codes, batch_size=batch_size)
    rows = sample(prior, [[n_codes]] * n, cfg, eos_id=n_codes, pad_id=n_codes, seed=seed)
    return [r[:-1] if r and r[-1] == n_codes else r for r in rows]


def pad_codes(plans: Sequence[Sequence[int]], device=None) -> tuple[Tensor, Tensor]:
    """Right-pad code lists → codes (B, L) long and mask (B, L) bool (L ≥ 1)."""
    lengths = torch.tensor([len(p) for p in plans])
    width = max(1, int(lengths.max()) if len(plans) else 1)
    codes = torch.zeros(len(plans), width, dtype=torch.long)
    for i, p in enumerate(plans):
        codes[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return codes.to(device), length_mask(lengths, width).to(device)


@torch.no_grad()
def sample_texts(model: LatentPlanLM, plans: Sequence[Sequence[int]], *, bos: int, eos: int,
                 seed: int, batch_size: int = 256) -> list[list[int]]:
    """One text per plan, x ~ p(x | z) at T = 1: token ids after BOS, cut after the first EOS.

    A plan of L codes covers L·2^n_down positions; a text that has not ended by then is returned
    as is (no EOS: unfinished). An empty plan gives an empty text.

    Why our own loop rather than ``generate``: step t must add plan vector t to the embedding of
    the token it feeds. ``generate`` uses ``inputs_embeds`` for the prompt only and embeds every
    later token itself, so the per-position sum would need a wrapped embedding module that tracks
    the cache position. The loop below is the same computation in plain sight: all rows start at
    BOS together (no padding, so no attention mask), one token per step through GPT-2's KV cache.
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = []
    for lo in range(0, len(plans), batch_size):
        out += _sample_batch(model, plans[lo : lo + batch_size], bos, eos, gen, device)
    return out


def _sample_batch(model: LatentPlanLM, plans, bos: int, eos: int, gen, device) -> list[list[int]]:
    codes, code_mask = pad_codes(plans, device)  # (B, L)
    caps = code_mask.sum(1) * model.cfg.factor  # (B,) positions each plan covers
    plan = model.plan_from_codes(codes, code_mask)  # (B, W, H)
    lm, embed = model.decoder, model.decoder.get_input_embeddings()
    ids = torch.full((len(plans), 1), bos, dtype=torch.long, device=device)  # (B, 1)
    done, past, steps = caps == 0, None, []
    for t in range(plan.shape[1]):
        if bool(done.all()):
            break
        step = lm(inputs_embeds=embed(ids) + plan[:, t : t + 1], past_key_values=past, use_cache=True)
        past = step.past_key_values
        probs = step.logits[:, -1].float().softmax(-1)  # (B, V)
        ids = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
        steps.append(ids)
        done |= (ids[:, 0] == eos) | (caps <= t + 1)
    rows = torch.cat(steps, 1).tolist() if steps else [[] for _ in plans]
    return [_cut(row[: int(cap)], eos) for row, cap in zip(rows, caps)]


def _cut(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row
