"""The alignment experiment of the EXO paper (Ji et al., ICML 2024) on our data, stage by stage.

align_sample → preferences → reward → align@<method> (all seeds) and best_of_n. Each function here
is what one stage calls; the configs (``beyondlm/align/config.py``) are the params sections of the
same names, the Parquet tables between stages are read and written by ``beyondlm/align/store.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Collection

import numpy as np
import torch

from beyondlm.align.config import (
    AlignConfig,
    BestOfNConfig,
    EvalConfig,
    PreferencesConfig,
    RewardConfig,
    SampleConfig,
)
from beyondlm.align.data import (
    Group,
    PrefPair,
    draw_groups,
    pairs_from_groups,
    read_preference_file,
    tokenize_pairs,
    unpaired_examples,
)
from beyondlm.align.evaluate import (
    Judges,
    ReferenceSet,
    PolicySamples,
    best_of_n_kl,
    evaluate_policy,
    implicit_reward_accuracy,
    mean_se,
    policy_metrics,
    sample_policy,
)
from beyondlm.align.store import load_pairs, load_table, save_groups, save_pairs
from beyondlm.align.train import OFFLINE_COLLATE, offline_loss_fn, online_loss_fn, prompt_collate
from beyondlm import distributed
from beyondlm.config import ConfigError, record
from beyondlm.convergence import HeldOutValue
from beyondlm.data.sources import clean_text
from beyondlm.inputs import read_json
from beyondlm.intervals import proportion
from beyondlm.io import write_json
from beyondlm.logprobs import sequence_logps
from beyondlm.objectives.preference import PREFERENCE_LOSSES
from beyondlm.reward import Pair, build_reward_model, pair_accuracy, reward_loss_fn, score
from beyondlm.reward import pair_collate as rm_pair_collate
from beyondlm.sampling import SamplingConfig
from beyondlm.training import heldout_loss, train_loop

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stages
def run_sample(cfg: SampleConfig, model, tokenizer, prompts, *, max_new_tokens: int, oracle, out: Path) -> dict:
    """K samples per prompt with log π_sft and, given an ``Oracle`` (beyondlm/oracle.py), r* → ``out`` (parquet)."""
    prompts = prompts[: cfg.n_prompts or None]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=cfg.temperature,
                              batch_size=cfg.batch_size)
    groups, ref = draw_groups(model, prompts, cfg.K, sampling, eos_id=tokenizer.eos_token_id,
                              pad_id=tokenizer.pad_token_id, seed=cfg.seed, desc="align samples")
    rewards = None
    if oracle is not None:
        flat = [list(p[1:]) + c for p, g in zip(prompts, groups) for c in g]
        rewards = oracle.reward(flat).reshape(len(prompts), cfg.K)
    save_groups(out, prompts, groups, ref, rewards)
    lengths = [len(c) for g in groups for c in g]
    return {"n_prompts": len(prompts), "K": cfg.K, "temperature": cfg.temperature,
            "mean_length": float(np.mean(lengths)), "ref_logp_mean": float(ref.mean()),
            **({"oracle_mean": float(rewards.mean()), "oracle_std": float(rewards.std())} if rewards is not None else {})}


def _valid_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    valid = np.zeros(n, dtype=bool)
    valid[rng.permutation(n)[: max(1, int(round(fraction * n)))]] = True
    return valid


def _chosen_is_heldout(triple: tuple[str, str, str], heldout_texts: Collection[str]) -> bool:
    prompt, chosen, _ = triple
    return clean_text(prompt + chosen) in heldout_texts or clean_text(chosen) in heldout_texts


def run_preferences(cfg: PreferencesConfig, samples: Path, out: Path, *, sft=None, tokenizer=None,
                    max_len: int = 64, batch_size: int = 256, heldout_texts: Collection[str] = ()) -> dict:
    """Pairs with both reference log-probs and a train/valid split by prompt → ``out`` (parquet).
    ``valid_split=prepared``: the valid pairs are those whose chosen text (prompt + chosen, or the
    chosen completion alone), cleaned as ``prepare`` cleans, is one of ``heldout_texts``."""
    if cfg.source == "samples":
        t = load_table(samples)
        if "oracle" not in t:
            raise ConfigError("preferences.source=samples needs an oracle (the synthetic language, or "
                              "oracle.kind: classifier); for other data set preferences.source=file")
        valid = _valid_mask(len(t["prompt_ids"]), cfg.valid_fraction, cfg.seed)
        pairs, split = [], []
        for i in range(len(t["prompt_ids"])):
            new = pairs_from_groups([t["completions"][i]], np.array([t["ref_logps"][i]]),
                                    np.array([t["oracle"][i]]), [t["prompt_ids"][i]], cfg.max_pairs_per_prompt)
            pairs += new
            split += ["valid" if valid[i] else "train"] * len(new)
    else:
        f = cfg.file
        try:
            triples = read_preference_file(f.path, prompt_column=f.prompt_column, chosen_column=f.chosen_column,
                                           rejected_column=f.rejected_column, limit=f.limit)
        except (OSError, ValueError) as err:
            raise ConfigError(f"preferences.file.path={f.path!r}: {err}") from err
        rows, held = [], []
        for triple in triples:  # one at a time: tokenize_pairs drops pairs left equal by the cut
            kept = tokenize_pairs(tokenizer, [triple], max_len=max_len)
            rows += kept
            held += [_chosen_is_heldout(triple, heldout_texts)] * len(kept)
        seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
        starts = [len(p) for p, _, _ in rows] * 2
        ref, _ = sequence_logps(sft, seqs, pad_id=tokenizer.pad_token_id, starts=starts, batch_size=batch_size)
        ref_c, ref_r = ref[: len(rows)].tolist(), ref[len(rows) :].tolist()
        pairs = [PrefPair(p, c, r, a, b) for (p, c, r), a, b in zip(rows, ref_c, ref_r)]
        if cfg.valid_split == "prepared":
            valid = np.array(held, dtype=bool)
            if not valid.any():
                raise ConfigError("preferences.valid_split=prepared: no pair's chosen text is a prepared valid/test "
                                  "text; fix: prepare.source=local reading the same file with text_column = "
                                  "the chosen column (profiles/hh.yaml), or valid_split: random")
        else:
            valid = _valid_mask(len(pairs), cfg.valid_fraction, cfg.seed)
        split = ["valid" if v else "train" for v in valid]
    if not any(s == "train" for s in split):
        raise ConfigError("no training pairs: raise align_sample.n_prompts or lower preferences.valid_fraction")
    save_pairs(out, pairs, split)
    return {"source": cfg.source, "valid_split": cfg.valid_split, "n_train": split.count("train"), "n_valid": split.count("valid"),
            "margin_ref_mean": float(np.mean([p.ref_chosen - p.ref_rejected for p in pairs]))}


def run_reward(cfg: RewardConfig, pairs_path: Path, samples: Path, tokenizer, *, out_dir: Path,
               live_dir: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Train the BT reward model; held-out pair accuracy and, with an oracle, its correlation."""
    from scipy import stats

    train = [Pair(p.prompt_ids + p.chosen, p.prompt_ids + p.rejected) for p in load_pairs(pairs_path, "train")]
    valid = [Pair(p.prompt_ids + p.chosen, p.prompt_ids + p.rejected) for p in load_pairs(pairs_path, "valid")]
    torch.manual_seed(cfg.train.seed)
    model = build_reward_model(cfg.model, tokenizer)
    pad = model.config.pad_token_id
    collate = rm_pair_collate(pad)
    model, result = train_loop(model, train, reward_loss_fn, cfg.train, collate=collate, live_dir=live_dir,
                               validate=heldout_loss(reward_loss_fn, valid, collate) if valid else None,
                               desc="reward")
    model.eval()
    metrics = {"converged": bool(result.convergence and result.convergence["converged"]),
               "convergence": result.convergence,
               "train": asdict(result), "n_train_pairs": len(train), "n_valid_pairs": len(valid),
               "train_accuracy": pair_accuracy(model, [p.chosen for p in train[:2000]],
                                               [p.rejected for p in train[:2000]], pad_id=pad),
               "valid_accuracy": pair_accuracy(model, [p.chosen for p in valid], [p.rejected for p in valid],
                                               pad_id=pad) if valid else None}
    if valid:  # the held-out accuracy's sampling error: the report warns below intervals.WEAK_JUDGE
        metrics["valid_accuracy_interval"] = proportion(metrics["valid_accuracy"], len(valid))
    t = load_table(samples)
    if "oracle" in t:
        seqs = [list(p) + c for p, g in zip(t["prompt_ids"], t["completions"]) for c in g]
        r = score(model, seqs, pad_id=pad)
        o = np.asarray(t["oracle"]).reshape(-1)
        metrics["oracle_pearson"] = float(stats.pearsonr(r, o)[0])
        metrics["oracle_spearman"] = float(stats.spearmanr(r, o)[0])
    from beyondlm.models import save_model

    save_model(model, tokenizer, out_dir)
    return model, metrics


# the pair methods whose implicit reward is a positive multiple of log π/π_ref, and that multiple's
# hyperparameter (IPO's regression target is the log-ratio margin itself; its scale is irrelevant to
# the sign); SimPO's reward is reference-free and KTO's data unpaired: neither has this accuracy
IMPLICIT_REWARD = {"dpo_pref": "beta", "exo_pref": "beta", "ipo": "tau"}


def heldout_implicit_accuracy(policy, sft, pairs: list[PrefPair], *, beta: float, pad_id: int,
                              batch_size: int) -> dict:
    """``implicit_reward_accuracy`` of ``policy`` against ``sft`` on held-out pairs, with its
    interval (``intervals.proportion``). Both log-probs are computed here by the same batched call,
    so a policy equal to the reference ties on every pair (0.5), not on float noise."""
    seqs = [p.prompt_ids + p.chosen for p in pairs] + [p.prompt_ids + p.rejected for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    lp = {name: sequence_logps(m.eval(), seqs, pad_id=pad_id, starts=starts, batch_size=batch_size)[0].numpy()
          for name, m in (("policy", policy), ("ref", sft))}
    n = len(pairs)
    acc = implicit_reward_accuracy(lp["policy"][:n], lp["policy"][n:], lp["ref"][:n], lp["ref"][n:], beta=beta)
    return {**proportion(acc, n), "beta": beta, "ties": "½"}


def evaluation_prompts(cfg: EvalConfig, test_prompts, pairs: Path, *, max_len: int,
                       prompt_len: int) -> tuple[list[list[int]], int]:
    """(held-out prompts, max new tokens) for ``align.eval.prompts``: ``test``, prepare's
    prompts_test with max_len − prompt_len new tokens; ``pairs``, the distinct prompts of the
    held-out preference pairs in file order (``tokenize_pairs`` kept at most max_len // 2 of their
    last tokens), completed up to max_len tokens in all, as the pairs' completions were."""
    if cfg.prompts == "test":
        return [list(p) for p in test_prompts], max_len - prompt_len
    prompts = list(dict.fromkeys(tuple(p.prompt_ids) for p in load_pairs(pairs, "valid")))
    if not prompts:
        raise ConfigError("align.eval.prompts=pairs: the preference pairs have no held-out (valid) pairs; "
                          "raise preferences.valid_fraction or set align.eval.prompts: test")
    return [list(p) for p in prompts], max_len - max_len // 2


def judges_for(sft, reward_model, tokenizer, oracle, batch_size: int) -> Judges:
    return Judges(sft, reward_model, oracle.reward if oracle is not None else None,
                  tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size)


def _training_data(kind: str, samples: Path, pairs: Path, reward_model, tokenizer, sft) -> tuple[list, list]:
    """(train, valid) examples of a method of ``kind``: prompts (online; no held-out loss), pairs
    split as the preferences stage split them, the same pairs unpaired into labelled completions,
    or scored groups split by the same held-out prompts."""
    if kind == "online":
        return [list(p) for p in load_table(samples)["prompt_ids"]], []
    if kind == "pair":
        return load_pairs(pairs, "train"), load_pairs(pairs, "valid")
    if kind == "unpaired":
        return tuple(unpaired_examples(load_pairs(pairs, split), sft, tokenizer.pad_token_id, seed=i)
                     for i, split in enumerate(("train", "valid")))
    t = load_table(samples)
    K = len(t["completions"][0])
    seqs = [list(p) + c for p, g in zip(t["prompt_ids"], t["completions"]) for c in g]
    rm = score(reward_model, seqs, pad_id=tokenizer.pad_token_id).reshape(-1, K)
    held_out = {tuple(p.prompt_ids) for p in load_pairs(pairs, "valid")}
    groups = [Group(list(p), g, list(ref), r.tolist())
              for p, g, ref, r in zip(t["prompt_ids"], t["completions"], t["ref_logps"], rm)]
    return ([g for g in groups if tuple(g.prompt_ids) not in held_out],
            [g for g in groups if tuple(g.prompt_ids) in held_out])


EVALS = "evals.json"


def _resumed_evals(ckpt: Path, fingerprint: dict) -> list[dict]:
    """Evaluations an interrupted run of the same config already made (its training resumes from
    its checkpoint along the same seeded trajectory); none after a finished run or a config change."""
    path = ckpt / EVALS
    if not path.exists():
        return []
    saved = read_json(path, f"delete {ckpt} to start this seed's run over")
    if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        path.unlink()
        return []
    return saved["evals"]


def run_align(method: str, cfg: AlignConfig, *, sft_dir: Path, reward_model, tokenizer, oracle,
              samples: Path, pairs: Path, test_prompts, max_new_tokens: int, out_dir: Path,
              ckpt_dir: Path) -> dict | None:
    """Train one policy per seed from the SFT model; evaluate at step 0 and every ``eval_every``
    steps on held-out prompts; save each final policy to ``out_dir/s<seed>``. Under torchrun
    (``train.processes`` > 1) every rank trains; rank 0 evaluates, saves and returns the metrics,
    the others return None. Online methods sample each rank's share of the prompts with the same
    seeds, so their rollouts (not the loss normalisation) differ from one process's."""
    from beyondlm.models import load_model, save_model

    pad = tokenizer.pad_token_id
    sft = load_model(sft_dir).eval()
    judges = judges_for(sft, reward_model, tokenizer, oracle, cfg.eval.batch_size)
    pure = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size)
    ref_set = ReferenceSet.draw(judges, test_prompts[: cfg.eval.n_prompts], pure, seed=cfg.eval.seed + 7919)
    data, valid = _training_data(cfg.kind(method), samples, pairs, reward_model, tokenizer, sft)
    base = evaluate_policy(sft, judges, ref_set, pure, seed=cfg.eval.seed)
    hyper = cfg.loss(method)
    per_seed = {}
    for seed in cfg.seeds:
        train_cfg = cfg.train_config(method, seed)
        torch.manual_seed(seed)
        policy = load_model(sft_dir)
        stats: dict = {}
        if cfg.kind(method) == "online":
            rollout = replace(pure, batch_size=train_cfg.batch_size * int(hyper["K"]))
            loss_fn = online_loss_fn(method, hyper, sft, reward_model, sampling=rollout,
                                     eos_id=tokenizer.eos_token_id, pad_id=pad, seed=seed, stats=stats)
            collate = prompt_collate(pad)
        else:
            loss_fn = offline_loss_fn(method, hyper)
            collate = OFFLINE_COLLATE[cfg.kind(method)](pad)
        seed_ckpt = ckpt_dir / f"s{seed}"
        fingerprint = {"method": method, "hyper": hyper, "train": record(train_cfg),
                       "eval_every": cfg.eval_every, "n": len(data)}
        # rank 0 validates (training.HeldOut) and keeps the evaluations; other ranks only train
        evals = [{"step": 0, **base}] + (_resumed_evals(seed_ckpt, fingerprint) if distributed.is_main() else [])
        validate = _validation(method, cfg, hyper, loss_fn, valid, collate, evals, judges, ref_set, pure,
                               seed_ckpt, fingerprint)
        policy, result = train_loop(policy, data, loss_fn, train_cfg, collate=collate, validate=validate,
                                    ckpt_dir=seed_ckpt, fingerprint=fingerprint, desc=f"align {method} s{seed}")
        if not distributed.is_main():
            continue
        (seed_ckpt / EVALS).unlink(missing_ok=True)  # finished: nothing left to resume
        save_model(policy.eval(), tokenizer, out_dir / f"s{seed}")
        if method in IMPLICIT_REWARD and valid:  # the saved (best) policy on the held-out pairs
            implicit = {"implicit_accuracy": heldout_implicit_accuracy(
                policy, sft, valid, beta=float(hyper[IMPLICIT_REWARD[method]]), pad_id=pad, batch_size=cfg.eval.batch_size)}
        else:
            implicit = {}
        per_seed[f"s{seed}"] = {**implicit, "converged": result.convergence["converged"], "convergence": result.convergence,
                                "train": asdict(result), "evals": sorted(evals, key=lambda e: e["step"]),
                                **({"rollout": {k: float(np.mean(v[-5:])) for k, v in stats.items()}} if stats else {})}
    if not distributed.is_main():
        return None
    # the saved policy of each seed is its best held-out checkpoint: summarise the evaluation there
    finals = [next(e for e in run["evals"] if e["step"] == run["convergence"]["best_step"])
              for run in per_seed.values()]
    keys = [k for k in finals[0] if not k.endswith("_se")]
    summary = {k: {"mean": float(np.mean([f[k] for f in finals])), "std": float(np.std([f[k] for f in finals], ddof=1))
                   if len(finals) > 1 else 0.0} for k in keys}
    implicit = [run["implicit_accuracy"]["value"] for run in per_seed.values() if "implicit_accuracy" in run]
    if implicit:
        summary["implicit_accuracy"] = {"mean": float(np.mean(implicit)),
                                        "std": float(np.std(implicit, ddof=1)) if len(implicit) > 1 else 0.0}
    return {"method": method, "hyperparams": hyper, "seeds": list(cfg.seeds), "sft": base,
            "n_eval_prompts": len(ref_set.prompts), "eval_prompts": cfg.eval.prompts,
            "converged": all(run["converged"] for run in per_seed.values()),
            "final": summary, "runs": per_seed}


def online_objective(method: str, hyper: dict, e: dict, max_tokens: int,
                     samples: PolicySamples | None = None) -> float | HeldOutValue:
    """−(RM reward − β·KL) of an online method's held-out samples (evaluation ``e``), the sequence
    KL weighted as the method's loss weighs it: per sequence (RLOO's reward), per token of each
    sample (GRPO: KL/|o|), per token of the generation budget (Dr. GRPO: KL/max_tokens).

    With the evaluation's scored ``samples`` the same mean comes with its per-sample parts (one
    chunk per held-out prompt, the same prompts at every evaluation), so the convergence verdict
    can tell a gain from the sampling noise of the evaluation (``convergence.paired_se``)."""
    per = (max_tokens if hyper.get("unbiased") else max(e["length"], 1.0)) if PREFERENCE_LOSSES[method].tokens else 1.0
    if samples is None or samples.kl is None:
        return -(e["rm_reward"] - hyper["beta"] * e["kl"] / per)
    parts = -(np.asarray(samples.scores["rm"], np.float64) - hyper["beta"] * samples.kl / per)
    return HeldOutValue.from_chunks(parts.tolist(), [1.0] * len(parts))


def _validation(method: str, cfg: AlignConfig, hyper, loss_fn, valid, collate, evals, judges, ref_set, pure, ckpt,
                fingerprint):
    """``validate(policy, step)`` for the loop: evaluates the policy on the held-out prompts
    (appended to ``evals`` and saved for resuming) and returns the held-out objective: the
    method's loss on held-out pairs or groups, or for an online method (no offline data)
    ``online_objective`` of its own samples (a scalar for an evaluation read back after a crash)."""
    heldout = heldout_loss(loss_fn, valid, collate) if valid else None

    def validate(policy, step: int):
        e = next((e for e in evals if e["step"] == step), None)  # step 0, or evaluated before a crash
        samples = None
        if e is None:
            samples = sample_policy(policy, judges, ref_set, pure, seed=cfg.eval.seed)
            e = {"step": step, **policy_metrics(samples, ref_set)}
            evals.append(e)
            write_json(ckpt / EVALS, {"fingerprint": fingerprint, "evals": evals[1:]})
        if heldout is not None:
            return heldout(policy, step)
        return online_objective(method, hyper, e, pure.max_new_tokens, samples)

    return validate


def run_best_of_n(cfg: BestOfNConfig, sft, reward_model, tokenizer, oracle, test_prompts, *,
                  eval_cfg: EvalConfig, max_new_tokens: int) -> dict:
    """N samples from π_sft per held-out prompt, keep the reward model's favourite; for each N the
    same metrics as the aligned policies, with the analytic KL log N − (N−1)/N."""
    judges = judges_for(sft, reward_model, tokenizer, oracle, eval_cfg.batch_size)
    pure = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=eval_cfg.batch_size)
    ref_set = ReferenceSet.draw(judges, test_prompts[: eval_cfg.n_prompts], pure, seed=eval_cfg.seed + 7919)
    n_max = max(cfg.Ns)
    groups, _ = draw_groups(sft, ref_set.prompts, n_max, pure, eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id, seed=eval_cfg.seed, desc="best-of-n")
    flat = [p + c for p, g in zip(ref_set.prompts, groups) for c in g]
    rm = score(reward_model, flat, pad_id=tokenizer.pad_token_id).reshape(len(groups), n_max)
    rows = []
    for n in sorted(cfg.Ns):
        pick = rm[:, :n].argmax(1)
        conts = [g[j] for g, j in zip(groups, pick)]
        m = evaluate_policy(None, judges, ref_set, pure, seed=0, conts=conts)
        rows.append({"N": n, "kl": best_of_n_kl(n), **m})
    return {"Ns": sorted(cfg.Ns), "n_prompts": len(ref_set.prompts), "rows": rows}


def frontier_rows(result: dict) -> list[dict]:
    """Plot rows (method, seed, step, kl, oracle_reward, rm_reward) of one align result."""
    out = []
    for seed, run in result["runs"].items():
        for e in run["evals"]:
            out.append({"method": result["method"], "seed": seed, "step": e["step"], "kl": e.get("kl"),
                        "oracle_reward": e.get("oracle_reward"), "rm_reward": e["rm_reward"]})
    return out


__all__ = ["run_sample", "run_preferences", "run_reward", "run_align", "run_best_of_n", "frontier_rows", "mean_se"]
