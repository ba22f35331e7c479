"""Alignment objectives as ``loss_fn(model, batch)`` for the shared training loop.

Offline methods (DPO and EXO, -pref on pairs, -rw on groups of K scored samples; IPO and SimPO
on pairs; KTO on unpaired labelled completions; BOND on groups) read the reference log-probs stored
with their data: the reference model is never run during training (SimPO, reference-free, ignores
them).
The on-policy baseline is RLOO (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", ACL 2024): K samples per prompt from the
current policy, sequence reward R_i = r_φ(x, y_i) − β [log π_θ(y_i|x) − log π_sft(y_i|x)], the
leave-one-out baseline b_i = mean_{j≠i} R_j, and loss −(R_i − b_i) log π_θ(y_i|x). GRPO and
Dr. GRPO (Shao et al. 2024; Liu et al. 2025) sample the same way and score per token: group-
normalised advantages, clipped ratios and a per-token k3 KL to π_sft (`grpo_loss`). One
``online_loss_fn`` serves every online row of the table.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from beyondlm.align.data import Group, PrefPair, Unpaired
from beyondlm.logprobs import batch_sequence_logps, batch_token_logps, lm_targets, pad_batch
from beyondlm.objectives.preference import PREFERENCE_LOSSES
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


def unpaired_collate(pad_id: int):
    """list[Unpaired] → rows (B, T) + start, ref_logps, desirable (B,), and the mismatched rows
    ``kl_input_ids``, ``kl_attention_mask``, ``kl_start`` with ``kl_ref_logps`` (B,)."""

    def collate(examples: Sequence[Unpaired]) -> dict[str, Tensor]:
        batch = _rows([e.prompt_ids for e in examples], [e.completion for e in examples], pad_id)
        kl = _rows([e.kl_prompt_ids for e in examples], [e.completion for e in examples], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["ref_logps"] = torch.tensor([e.ref_logp for e in examples])
        batch["kl_ref_logps"] = torch.tensor([e.kl_ref_logp for e in examples])
        batch["desirable"] = torch.tensor([e.desirable for e in examples])
        return batch

    return collate


OFFLINE_COLLATE = {"pair": pair_collate, "group": group_collate, "unpaired": unpaired_collate}  # by row kind


def completion_tokens(batch: dict[str, Tensor]) -> Tensor:
    """|y| per row: the positions ``batch_sequence_logps`` sums (completion tokens, EOS included),
    from the same masks and ``start``. (2B, T) rows → (2B,) long."""
    return lm_targets(batch["input_ids"], batch["attention_mask"], batch["start"])[1].sum(-1)


def offline_loss_fn(name: str, hyperparams: dict):
    """``loss_fn(model, batch) -> (Σ per-example losses, n pairs, groups or unpaired examples)``."""
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
        elif spec.kind == "unpaired":  # KTO: the mismatched rows only set the reference point z_0
            with torch.no_grad():
                kl = batch_sequence_logps(model, *(batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "start")))
            loss = spec.fn(logps, batch["ref_logps"], batch["desirable"], kl, batch["kl_ref_logps"], **hyperparams)
        else:
            B, K = batch["rewards"].shape
            loss = spec.fn(logps.view(B, K), batch["ref_logps"], batch["rewards"], **hyperparams)
        return loss.sum(), loss.shape[0]

    return loss_fn


def prompt_collate(pad_id: int):
    """list[prompt ids] → the prompts right-padded (the online losses sample from them)."""

    def collate(prompts: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        ids, mask = pad_batch(prompts, pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def online_loss_fn(name: str, hyperparams: dict, ref_model, reward_model, *, sampling: SamplingConfig,
                   eos_id: int, pad_id: int, seed: int, stats: dict | None = None):
    """On-policy ``loss_fn(model, batch) -> (Σ per-prompt losses, n prompts)`` of the online row
    ``name`` (RLOO, GRPO, Dr. GRPO) with its ``hyperparams``. Each call samples K completions per
    prompt from the current policy (seeded by ``seed`` and the call count, so a run is
    reproducible), scores them with the reward model, and takes token log-probs of the policy
    (with grad) and of the frozen SFT reference (``ref_model``) on the same rows. A row with
    ``tokens`` gets them per token with the completion mask, the policy's own detached values as
    π_old (one optimizer step per rollout) and max_tokens = ``sampling.max_new_tokens``; the
    others get the sequence sums (B, K).
    ``stats`` (if given) collects the mean reward, sequence KL (log π_θ − log π_sft) and completion
    length (tokens, EOS included) of every call."""
    spec, K, calls = PREFERENCE_LOSSES[name], int(hyperparams["K"]), [0]
    ref_device = next(ref_model.parameters()).device

    def loss_fn(model, batch):
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        repeated = [p for p in prompts for _ in range(K)]  # prompt-major: group i is rows iK .. iK + K − 1
        conts, _ = sample_scored(model, repeated, sampling, eos_id=eos_id, pad_id=pad_id,
                                 seed=seed * 1_000_003 + calls[0])
        calls[0] += 1
        model.train()
        r = torch.as_tensor(score(reward_model, [p + c for p, c in zip(repeated, conts)], pad_id=pad_id))
        rows = _rows(repeated, conts, pad_id)
        device = batch["input_ids"].device
        keys = ("input_ids", "attention_mask", "start")
        logps, mask = batch_token_logps(model, *(rows[k].to(device) for k in keys))  # (BK, T−1), with grad
        with torch.no_grad():
            ref = batch_token_logps(ref_model, *(rows[k].to(ref_device) for k in keys))[0].to(device)
        B = len(prompts)
        group = lambda t: t.view(B, K, *t.shape[1:])  # noqa: E731  (BK, ...) → (B, K, ...)
        rewards = group(r.to(device))
        if spec.tokens:  # GRPO, Dr. GRPO: per-token ratios and KL
            loss = spec.fn(group(logps), group(logps.detach()), group(ref), group(mask), rewards,
                           max_tokens=sampling.max_new_tokens, **hyperparams)
        else:  # RLOO: sequence log-probs
            loss = spec.fn(group(logps.sum(-1)), group(ref.sum(-1)), rewards, **hyperparams)
        if stats is not None:
            stats.setdefault("reward", []).append(float(r.mean()))
            stats.setdefault("kl", []).append(float((logps.detach() - ref).sum(-1).double().mean()))
            stats.setdefault("length", []).append(float(mask.sum(-1).double().mean()))  # tokens per completion
        return loss.sum(), B

    return loss_fn
