"""Evaluating aligned policies: oracle reward against KL(π_θ ‖ π_sft), and win rates.

On held-out prompts, each policy draws one pure sample per prompt (T = 1: a draw from π_θ).
- KL(π_θ‖π_sft) ≈ mean over those samples of log π_θ(y|x) − log π_sft(y|x) (sequence log-probs,
  EOS included; unbiased, with its standard error);
- oracle reward r*(x, y) on the synthetic language (the labeler the preferences came from) and the
  learned reward model's score;
- win rates against a fixed reference set drawn once from π_sft: against an SFT sample for the same
  prompt, and against the *chosen* completion (the better of two SFT samples under the oracle),
  each judged by the oracle and by the reward model; ties count one half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from beyondlm.logprobs import sequence_logps
from beyondlm.reward import score
from beyondlm.sampling import SamplingConfig, sample_scored


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) + ½ P(a = b) over paired scores."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


@dataclass(frozen=True)
class Judges:
    """What the evaluation scores with: the frozen SFT model (for KL), the reward model, and the
    oracle (a callable on full token lists without BOS; None where no oracle exists)."""

    sft: object
    reward_model: object
    oracle: object | None
    eos_id: int
    pad_id: int
    batch_size: int = 512

    def scores(self, prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]]) -> dict:
        seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
        out = {"rm": score(self.reward_model, seqs, pad_id=self.pad_id, batch_size=self.batch_size)}
        if self.oracle is not None:
            out["oracle"] = np.asarray(self.oracle([s[1:] for s in seqs]), dtype=np.float64)
        return out


@dataclass(frozen=True)
class ReferenceSet:
    """Two SFT samples per held-out prompt, scored once: ``sft`` (the first) and ``chosen`` (the
    better of the two under the oracle, or the reward model where there is no oracle)."""

    prompts: list[list[int]]
    sft: dict
    chosen: dict

    @classmethod
    def draw(cls, judges: Judges, prompts, cfg: SamplingConfig, seed: int) -> "ReferenceSet":
        prompts = [list(p) for p in prompts]
        repeated = [p for p in prompts for _ in range(2)]
        conts, _ = sample_scored(judges.sft, repeated, cfg, eos_id=judges.eos_id,
                                 pad_id=judges.pad_id, seed=seed)
        s = judges.scores(repeated, conts)
        label = s.get("oracle", s["rm"]).reshape(-1, 2)
        pick = label.argmax(1)  # first of a tie
        two = {k: v.reshape(-1, 2) for k, v in s.items()}
        rows = np.arange(len(prompts))
        return cls(prompts, {k: v[:, 0] for k, v in two.items()}, {k: v[rows, pick] for k, v in two.items()})


@dataclass(frozen=True)
class PolicySamples:
    """One policy's samples on the reference prompts, scored: ``scores`` (``rm``, and ``oracle``
    where one exists) and ``kl`` = log π_θ(y|x) − log π_sft(y|x) per sample (None without the
    policy's log-probs), all (N,) in prompt order."""

    conts: list
    scores: dict
    kl: np.ndarray | None


def sample_policy(policy, judges: Judges, ref: ReferenceSet, cfg: SamplingConfig, seed: int,
                  *, logps: np.ndarray | None = None, conts=None) -> PolicySamples:
    """``conts``/``logps`` let a caller pass samples it already has (best-of-N); by default the policy
    samples here and its log-probs are read off the sampling pass."""
    if conts is None:
        conts, sc = sample_scored(policy, ref.prompts, cfg, eos_id=judges.eos_id, pad_id=judges.pad_id,
                                  seed=seed)
        logps = sc.logps
    kl = None
    if logps is not None:
        ref_lp, _ = sequence_logps(judges.sft, [p + list(c) for p, c in zip(ref.prompts, conts)],
                                   pad_id=judges.pad_id, starts=[len(p) for p in ref.prompts],
                                   batch_size=judges.batch_size)
        kl = np.asarray(logps, dtype=np.float64) - ref_lp.numpy()
    return PolicySamples(list(conts), judges.scores(ref.prompts, conts), kl)


def policy_metrics(ps: PolicySamples, ref: ReferenceSet) -> dict:
    """The metrics of the module docstring from one policy's scored samples."""
    s = ps.scores
    out: dict = {"rm_reward": mean_se(s["rm"])[0],
                 "length": float(np.mean([len(c) for c in ps.conts])),
                 "win_vs_sft/rm": win_rate(s["rm"], ref.sft["rm"]),
                 "win_vs_chosen/rm": win_rate(s["rm"], ref.chosen["rm"])}
    if ps.kl is not None:
        out["kl"], out["kl_se"] = mean_se(ps.kl)
    if "oracle" in s:
        out["oracle_reward"], out["oracle_reward_se"] = mean_se(s["oracle"])
        out["win_vs_sft/oracle"] = win_rate(s["oracle"], ref.sft["oracle"])
        out["win_vs_chosen/oracle"] = win_rate(s["oracle"], ref.chosen["oracle"])
    return out


def evaluate_policy(policy, judges: Judges, ref: ReferenceSet, cfg: SamplingConfig, seed: int,
                    *, logps: np.ndarray | None = None, conts=None) -> dict:
    """Metrics of one policy on the reference set's prompts (see the module docstring;
    ``conts``/``logps`` as in ``sample_policy``)."""
    return policy_metrics(sample_policy(policy, judges, ref, cfg, seed, logps=logps, conts=conts), ref)


def implicit_reward_accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float) -> float:
    """Fraction of pairs the policy's implicit reward r̂(x, y) = β log π(y|x)/π_ref(y|x) (DPO,
    Rafailov et al. 2023, eq. 5; EXO's policy parametrises the same r̂) ranks the right way:
    margin = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] > 0, ties (margin = 0,
    e.g. π = π_ref) count ½ as in ``win_rate``. Inputs (N,) sequence log-probs; β > 0."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    margin = beta * ((np.asarray(policy_chosen, np.float64) - np.asarray(ref_chosen, np.float64))
                     - (np.asarray(policy_rejected, np.float64) - np.asarray(ref_rejected, np.float64)))
    return win_rate(margin, np.zeros_like(margin))


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN ‖ π_sft) = log n − (n − 1)/n, the standard analytic value (exact when the samples
    are almost surely distinct; an upper bound otherwise, Beirami et al. 2024)."""
    return float(np.log(n) - (n - 1) / n)
