"""Alignment objectives as ``loss_fn(model, batch)`` for the shared training loop.

Offline methods (DPO and EXO, -pref on pairs, -rw on groups of K scored samples; IPO and SimPO
on pairs) read the reference log-probs stored with their data: the reference model is never run
during training (SimPO, reference-free, ignores them).
The on-policy baseline is RLOO (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", ACL 2024): K samples per prompt from the
current policy, sequence reward R_i = r_φ(x, y_i) − β [log π_θ(y_i|x) − log π_sft(y_i|x)], the
leave-one-out baseline b_i = mean_{j≠i} R_j, and loss −(R_i − b_i) log π_θ(y_i|x).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from beyondlm.align.data import Group, PrefPair
from beyondlm.logprobs import batch_sequence_logps, lm_targets, pad_batch, sequence_logps
from beyondlm.objectives.preference import PREFERENCE_LOSSES, rloo_loss
from beyondlm.reward import score
from beyondlm.sampling import SamplingConfig, sample_scored


def _rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> dict:
    ids, mask = pad_batch([list(p) + list(c) for p, c in zip(prompts, completions)], pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "start": torch.tensor([len(p) for p in prompts])}


def pair_collate(pad_id: int):
    """list[PrefPair] → rows [chosen; rejected] (2B, T) + start + ref_chosen, ref_rejected (B,)."""

    def collate(pairs: Sequence[PrefPair]) -> dict[str, Tensor]:
        prompts = [p.prompt_ids for p in pairs] * 2
        batch = _rows(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs])
        batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs])
        return batch

    return collate


def group_collate(pad_id: int):
    """list[Group] (B groups of K) → rows (B·K, T) prompt-major + ref_logps, rewards (B, K)."""

    def collate(groups: Sequence[Group]) -> dict[str, Tensor]:
        prompts = [g.prompt_ids for g in groups for _ in g.completions]
        batch = _rows(prompts, [c for g in groups for c in g.completions], pad_id)
        batch["ref_logps"] = torch.tensor([g.ref_logps for g in groups])
        batch["rewards"] = torch.tensor([g.rewards for g in groups])
        return batch

    return collate


def completion_tokens(batch: dict[str, Tensor]) -> Tensor:
    """|y| per row: the positions ``batch_sequence_logps`` sums (completion tokens, EOS included),
    from the same masks and ``start``. (2B, T) rows → (2B,) long."""
    return lm_targets(batch["input_ids"], batch["attention_mask"], batch["start"])[1].sum(-1)


def offline_loss_fn(name: str, hyperparams: dict):
    """``loss_fn(model, batch) -> (Σ per-pair or per-group losses, n pairs or groups)``."""
    spec = PREFERENCE_LOSSES[name]

    def loss_fn(model, batch):
        logps = batch_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["start"])
        if spec.kind == "pair":
            chosen, rejected = logps.chunk(2)  # (B,), (B,)
            lengths = {}
            if spec.lengths:  # IPO, SimPO: per-token means need |y_w|, |y_l|
                n_chosen, n_rejected = completion_tokens(batch).chunk(2)  # (B,), (B,)
                lengths = {"chosen_tokens": n_chosen, "rejected_tokens": n_rejected}
            loss = spec.fn(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], **lengths, **hyperparams)
        else:
            B, K = batch["rewards"].shape
            loss = spec.fn(logps.view(B, K), batch["ref_logps"], batch["rewards"], **hyperparams)
        return loss.sum(), loss.shape[0]

    return loss_fn


def prompt_collate(pad_id: int):
    """list[prompt ids] → the prompts right-padded (the RLOO loss samples from them)."""

    def collate(prompts: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        ids, mask = pad_batch(prompts, pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def rloo_loss_fn(ref_model, reward_model, *, K: int, beta: float, sampling: SamplingConfig,
                 eos_id: int, pad_id: int, seed: int, stats: dict | None = None):
    """On-policy loss: each call samples K completions per prompt from the current policy (seeded
    by ``seed`` and the call count, so a run is reproducible), scores them with the reward model
    and the frozen SFT reference, and returns (Σ per-prompt RLOO losses, n prompts).
    ``stats`` (if given) collects the mean reward and KL of every call."""
    calls = [0]

    def loss_fn(model, batch):
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        repeated = [p for p in prompts for _ in range(K)]
        conts, _ = sample_scored(model, repeated, sampling, eos_id=eos_id, pad_id=pad_id,
                                 seed=seed * 1_000_003 + calls[0])
        calls[0] += 1
        model.train()
        seqs = [p + c for p, c in zip(repeated, conts)]
        starts = [len(p) for p in repeated]
        ref, _ = sequence_logps(ref_model, seqs, pad_id=pad_id, starts=starts)
        r = torch.as_tensor(score(reward_model, seqs, pad_id=pad_id))
        rows = _rows(repeated, conts, pad_id)
        device = batch["input_ids"].device
        logps = batch_sequence_logps(model, *(rows[k].to(device) for k in ("input_ids", "attention_mask", "start")))
        B = len(prompts)
        shape = lambda t: t.to(device).view(B, K)  # noqa: E731
        loss = rloo_loss(logps.view(B, K), shape(ref), shape(r), beta=beta)
        if stats is not None:
            stats.setdefault("reward", []).append(float(r.mean()))
            stats.setdefault("kl", []).append(float((logps.detach().cpu().double() - ref).mean()))
        return loss.sum(), B

    return loss_fn
