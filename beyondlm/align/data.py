"""Alignment data: K scored samples per prompt, preference pairs, and pairs read from files.

A *group* is one prompt's K completions from the SFT model with their reference log-probs
log π_sft(y | x), computed once while sampling (the sampler's own raw logits) and never again.
A *pair* is (prompt, chosen, rejected) with both reference log-probs. All token lists are ids of
the prepared tokenizer: ``prompt_ids`` starts with BOS, a completion ends with EOS when finished.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np

from beyondlm.inputs import InputError, read_jsonl, read_parquet, reading, require, require_columns
from beyondlm.logprobs import sequence_logps
from beyondlm.sampling import SamplingConfig, sample_scored

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Group:
    """One prompt's K completions, their log π_sft and the rewards the -rw objectives target."""

    prompt_ids: list[int]
    completions: list[list[int]]
    ref_logps: list[float]
    rewards: list[float]

    def __len__(self) -> int:  # for length grouping: the longest row it contributes
        return len(self.prompt_ids) + max(len(c) for c in self.completions)


@dataclass(frozen=True)
class PrefPair:
    """A preference pair with the reference log-probs of both completions."""

    prompt_ids: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float
    ref_rejected: float

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen), len(self.rejected))


@dataclass(frozen=True)
class Unpaired:
    """A completion labelled desirable or undesirable (KTO), with log π_ref(y | x) and a mismatched
    pair for KTO's reference point: the same completion under another example's prompt."""

    prompt_ids: list[int]
    completion: list[int]
    ref_logp: float
    desirable: bool
    kl_prompt_ids: list[int]
    kl_ref_logp: float

    def __len__(self) -> int:
        return max(len(self.prompt_ids), len(self.kl_prompt_ids)) + len(self.completion)


def unpair(pairs: Sequence[PrefPair]) -> list[tuple[list[int], list[int], float, bool]]:
    """(prompt, completion, ref log-prob, desirable) from preference pairs: each distinct
    completion of a prompt is desirable when it is chosen in more of its pairs than rejected,
    undesirable when rejected more often, and dropped on a tie. With one pair per completion (a
    preference file) chosen is desirable and rejected undesirable, TRL's unpairing; with every pair
    of a prompt's K samples (``pairs_from_groups``) this is the oracle's above/below-median split."""
    wins: dict[tuple, list] = {}
    for p in pairs:
        for comp, ref, won in ((p.chosen, p.ref_chosen, 1), (p.rejected, p.ref_rejected, -1)):
            entry = wins.setdefault((tuple(p.prompt_ids), tuple(comp)), [ref, 0])
            entry[1] += won
    return [(list(prompt), list(comp), ref, net > 0) for (prompt, comp), (ref, net) in wins.items() if net != 0]


def mismatched_prompts(prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
    """For each example's prompt, another prompt to pair its completion with (KTO's mismatched
    pair): the distinct prompts in a seeded random cycle, each example taking the next one (TRL
    shifts by one within a batch, which can meet the same prompt; this cannot, given two prompts)."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    order = np.random.default_rng(seed).permutation(len(distinct))
    nxt = {distinct[i]: list(distinct[j]) for i, j in zip(order, np.roll(order, -1))}
    return [nxt[tuple(p)] for p in prompts]


def unpaired_examples(pairs: list[PrefPair], sft, pad_id: int, seed: int) -> list[Unpaired]:
    """KTO's examples from preference pairs (``unpair``), each with a mismatched prompt and
    log π_sft of its completion under it (the reference never runs during training)."""
    rows = unpair(pairs)
    kl_prompts = mismatched_prompts([r[0] for r in rows], seed)
    kl_ref, _ = sequence_logps(sft, [p + c for p, (_, c, _, _) in zip(kl_prompts, rows)], pad_id=pad_id,
                               starts=[len(p) for p in kl_prompts])
    return [Unpaired(p, c, ref, good, kp, float(kr)) for (p, c, ref, good), kp, kr in zip(rows, kl_prompts, kl_ref)]


def draw_groups(model, prompts: Sequence[Sequence[int]], K: int, cfg: SamplingConfig, *, eos_id: int,
                pad_id: int, seed: int, desc: str | None = None) -> tuple[list[list[list[int]]], np.ndarray]:
    """K completions per prompt (one batched call, prompt-major) and log π(y | x) of each, (N, K).

    The log-probs come from the model's raw logits during sampling: they are log π itself at any
    temperature, so they serve as the reference log-probs of the -rw objectives and of DPO."""
    repeated = [list(p) for p in prompts for _ in range(K)]
    conts, scores = sample_scored(model, repeated, cfg, eos_id=eos_id, pad_id=pad_id, seed=seed, desc=desc)
    groups = [conts[i * K : (i + 1) * K] for i in range(len(prompts))]
    return groups, scores.logps.reshape(len(prompts), K)


def pairs_from_groups(completions: Sequence[Sequence[Sequence[int]]], ref_logps: np.ndarray,
                      labels: np.ndarray, prompts: Sequence[Sequence[int]],
                      max_pairs: int = 0) -> list[PrefPair]:
    """Every pair (i < j) of a prompt's samples whose labeler scores differ; chosen = higher score.

    ``labels`` (N, K): the labeler (the oracle r* on the synthetic language). Ties give no pair.
    ``max_pairs`` > 0 keeps the pairs with the largest score gaps first, per prompt."""
    pairs = []
    for p, comps, ref, lab in zip(prompts, completions, np.asarray(ref_logps), np.asarray(labels)):
        cand = [(abs(lab[i] - lab[j]), i, j) for i, j in combinations(range(len(comps)), 2)
                if lab[i] != lab[j]]
        cand.sort(key=lambda t: -t[0])
        for _, i, j in cand[: max_pairs or None]:
            w, l = (i, j) if lab[i] > lab[j] else (j, i)
            pairs.append(PrefPair(list(p), list(comps[w]), list(comps[l]), float(ref[w]), float(ref[l])))
    return pairs


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of an HH-RLHF style pair: the prompt is the
    common prefix up to and including the last "\\n\\nAssistant:" both dialogues share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError("no common '\\n\\nAssistant:' turn in a chosen/rejected pair: give a prompt column")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _read_rows(path: Path, fix: str) -> list[dict]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        t = read_parquet(path, fix)
        return [dict(zip(t, row)) for row in zip(*t.values())]
    if name.endswith(".jsonl"):
        return read_jsonl(path, fix)
    if name.endswith(".json"):
        with reading(path, "JSON file", fix):
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, list) else data["data"]
    raise InputError(path, "unknown format", "use .jsonl, .json or .parquet (optionally .gz)")


def read_preference_file(path: str | Path, *, prompt_column: str | None = "prompt",
                         chosen_column: str = "chosen", rejected_column: str = "rejected",
                         limit: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from a hub-style preference file.

    With a prompt column, chosen/rejected are the completions. Without one (HH-RLHF: whole
    dialogues in chosen and rejected) the prompt is their shared prefix up to the last assistant
    turn. Pairs with identical completions are dropped (they carry no preference)."""
    fix = "fix the file, or set preferences.file.path / chosen_column / rejected_column"
    path = require(path, "preference file", fix)
    rows = _read_rows(path, fix)
    if not rows:
        raise InputError(path, "has no rows", fix)
    require_columns(path, sorted(rows[0]), (chosen_column, rejected_column), fix)
    has_prompt = prompt_column is not None and prompt_column in rows[0]
    out = []
    for row in rows[: limit or None]:
        if has_prompt:
            triple = (row[prompt_column], row[chosen_column], row[rejected_column])
        else:
            triple = split_hh(row[chosen_column], row[rejected_column])
        if triple[1] != triple[2]:
            out.append(triple)
    return out


def tokenize_pairs(tokenizer, triples: Sequence[tuple[str, str, str]], *, max_len: int) -> list[tuple]:
    """Token ids (prompt with BOS, chosen + EOS, rejected + EOS); the prompt keeps its last tokens
    and completions are cut so prompt + completion ≤ max_len + 1 (dropping pairs left empty)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for prompt, chosen, rejected in triples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_len // 2):]
        room = max_len - len(p)
        c = tokenizer(chosen, add_special_tokens=False)["input_ids"][: room - 1] + [eos]
        r = tokenizer(rejected, add_special_tokens=False)["input_ids"][: room - 1] + [eos]
        if c != r:
            out.append(([bos, *p], c, r))
    return out
