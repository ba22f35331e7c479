"""Offline alignment per-step cost: our DPO vs TRL's DPOTrainer, and EXO-rw vs DPO-rw.

    python -m benchmarks.align --impl ours|trl|rw|pairs|online   # one measurement, one JSON line
    python -m benchmarks.align                        # the whole bench → reports/bench/align.json

1. DPO (targets: ours ≤ 1.0× TRL per optimizer step). Ours: ``dpo_pref`` through ``train_loop`` +
   ``offline_loss_fn`` + ``pair_collate``, reference log-probs stored in each ``PrefPair`` (as the
   ``preferences`` stage does). TRL: ``DPOTrainer(loss_type="sigmoid", precompute_ref_log_probs=True)``,
   so neither runs the reference model during the timed steps. Same tiny GPT-2 (``sft.model`` of
   params.yaml), same pairs (prompt = BOS + 8 words of a text of the synthetic language, completions
   = the rest of two texts, ≤ 56 tokens with EOS; TRL gets them as text and its token ids are checked
   equal to ours), same batch, lr schedule, AdamW (fused, β2 = 0.95), clipping, fp32 on CPU, no
   gradient checkpointing (TRL's default is on), no length grouping (the ``align`` stage's setting).
   Each run is a fresh process; the clock runs from the end of step ``warmup`` to the end of the last
   step; the median over interleaved rounds is reported.
2. EXO-rw and BOND vs DPO-rw (target ≤ 1.2×): through our loop on the same groups of K = 4 and the
   same prompt batches (same seed), interleaved in one process.
3. Every offline pair loss of the table (EXO-pref, IPO, SimPO) and KTO vs DPO-pref (target ≤ 1.2×):
   the same pairs and batches through our loop (KTO: the same completions, unpaired), interleaved
   in one process (``--impl pairs``).
4. GRPO and Dr. GRPO vs RLOO per optimizer step (target ≤ 1.1×), the on-policy rows: each step
   samples K completions per prompt, scores them with a reward model and the frozen reference, and
   takes one step (``online_loss_fn``). Same prompts, K, sampling settings and seed, so the first
   rollouts are identical (later ones follow each method's own policy: the mean completion length
   is reported with the times), interleaved in one process (``--impl online``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Sequence

import numpy as np
import torch

from beyondlm.align.data import Group, PrefPair, unpaired_examples
from beyondlm.align.train import group_collate, offline_loss_fn, pair_collate, unpaired_collate
from beyondlm.align.train import online_loss_fn, prompt_collate
from beyondlm.config import ModelConfig, TrainConfig, load_section, read_params, section
from beyondlm.data import tokenization
from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
from beyondlm.logprobs import sequence_logps
from beyondlm.models import build_model
from beyondlm.objectives.preference import resolve_preference_loss

ROOT = Path(__file__).resolve().parents[1]
PROMPT_WORDS = 8  # prepare.prompt_len; with BOS the prompt is 9 tokens
MAX_COMPLETION = 56  # prepare.max_len − prompt_len: the samplers' max_new_tokens
BETA = 0.1  # align.hyperparams.dpo_pref
RW = {"beta_pi": 0.1, "beta_r": 1.0}  # align.hyperparams.{dpo_rw, exo_rw}
RW_METHODS = ("dpo_rw", "exo_rw")
GROUP_METHODS = (*RW_METHODS, "bond")  # every offline group row of the loss table (BOND at its defaults)
# One intra-op thread per measured process: on the 2 shared cores, 2 OpenMP threads under load made
# a step ~10x slower and erratic (threads waiting on each other), which would swamp the ratios.
THREADS = 1


def setup(n_prompts: int, K: int):
    """Tokenizer, the default tiny GPT-2, and ``n_prompts`` prompts with K completions each:
    prompt = [BOS] + the first 8 words of a text, completions = the tails of K other texts."""
    language = SyntheticLanguage.build(LanguageSpec())
    tok = tokenization.word_tokenizer(language.vocab)
    texts = [s for s in language.sample(4 * n_prompts * (K + 1), np.random.default_rng(0))
             if len(s) > PROMPT_WORDS + 1]
    prompts = [[tok.bos_token_id, *s[:PROMPT_WORDS]] for s in texts[:n_prompts]]
    tails = [s[PROMPT_WORDS:][:MAX_COMPLETION] for s in texts[n_prompts:]]  # ends with EOS (texts ≤ 64 tokens)
    completions = [tails[i * K : (i + 1) * K] for i in range(n_prompts)]
    model_cfg = load_section(ModelConfig, section(read_params(ROOT / "params.yaml"), "sft").get("model"), "sft.model")
    torch.manual_seed(0)
    return tok, build_model(model_cfg, tok), prompts, completions


def reference_logps(model, tok, prompts, completions) -> np.ndarray:
    """log π_ref(y | x) of every completion, (N, K): computed once, as the align_sample stage does."""
    K = len(completions[0])
    seqs = [p + c for p, cs in zip(prompts, completions) for c in cs]
    starts = [len(p) for p in prompts for _ in range(K)]
    ref, _ = sequence_logps(model, seqs, pad_id=tok.pad_token_id, starts=starts)
    return ref.numpy().reshape(len(prompts), K)


def train_cfg(steps: int, batch_size: int) -> TrainConfig:
    """The ``align`` stage's loop settings (no checkpoints: they are not part of a step)."""
    return TrainConfig(lr=1e-3, batch_size=batch_size, max_steps=steps, warmup_steps=5, ckpt_every=0,
                       log_every=10, group_by_length=False)


def timed_loop(model, data, loss_fn, collate, cfg: TrainConfig, warmup: int) -> dict:
    """Run our loop for cfg.max_steps steps; seconds per step after step ``warmup``, and the mean
    padded width of the batches."""
    from beyondlm.training import train_loop

    marks, widths, fill = {}, [], []

    def on_step(step: int) -> None:
        if step in (warmup, cfg.max_steps):
            marks[step] = time.perf_counter()

    def counting(rows):
        batch = collate(rows)
        widths.append(batch["input_ids"].shape[1])
        fill.append(batch["attention_mask"].float().mean().item())
        return batch

    train_loop(model, data, loss_fn, cfg, collate=counting, on_step=on_step, desc="bench")
    return {"step_s": (marks[cfg.max_steps] - marks[warmup]) / (cfg.max_steps - warmup),
            "mean_width": float(np.mean(widths[warmup:])), "real_token_fraction": float(np.mean(fill[warmup:]))}


def pair_data(steps: int, batch_size: int, ref_rows: int | None = None):
    """Tokenizer, model, pairs with stored reference log-probs, and the loop's batch order (one
    epoch, seed 0, no length grouping); ``ref_rows`` limits the reference pass to the first rows."""
    from beyondlm.training import BatchOrder

    tok, model, prompts, comps = setup(batch_size * steps, K=2)
    n = ref_rows or len(prompts)
    ref = reference_logps(model, tok, prompts[:n], comps[:n])
    pairs = [PrefPair(p, c[0], c[1], float(r[0]), float(r[1])) for p, c, r in zip(prompts, comps, ref)]
    order = BatchOrder(len(prompts), batch_size, seed=0)
    return tok, model, prompts, comps, pairs, order


def run_ours(steps: int, warmup: int, batch_size: int) -> dict:
    tok, model, _, _, pairs, _ = pair_data(steps + warmup, batch_size)
    out = timed_loop(model, pairs, offline_loss_fn("dpo_pref", {"beta": BETA}), pair_collate(tok.pad_token_id),
                     train_cfg(steps + warmup, batch_size), warmup)
    return {"impl": "ours", **out, "vocab": len(tok), "n_params": sum(p.numel() for p in model.parameters())}


def _trl_dataset(tok, prompts, comps):
    """Text rows that the word tokenizer maps back to exactly our ids (checked after TRL tokenizes)."""
    import datasets

    text = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return datasets.Dataset.from_dict({"prompt": [text(p) for p in prompts],
                                       "chosen": [" " + text(c[0]) for c in comps],
                                       "rejected": [" " + text(c[1]) for c in comps]})


def run_trl(steps: int, warmup: int, batch_size: int) -> dict:
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    total = steps + warmup
    tok, model, prompts, comps, pairs, order = pair_data(total, batch_size, ref_rows=4 * batch_size)
    # rows in our loop's batch order, read sequentially: TRL gets exactly our batches, step by step
    rows = [i for s in range(total) for i in order.indices(s)]
    marks, widths = {}, []

    class Clock(TrainerCallback):  # same marks as ours: end of step `warmup`, end of the last step
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, total):
                marks[state.global_step] = time.perf_counter()

    cfg = train_cfg(total, batch_size)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, loss_type="sigmoid", beta=BETA, precompute_ref_log_probs=True,
            precompute_ref_batch_size=256, per_device_train_batch_size=batch_size, max_steps=total,
            learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, adam_beta2=0.95,
            optim="adamw_torch_fused", logging_steps=cfg.log_every, save_strategy="no", report_to=[],
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, max_length=None,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed,
        )
        data = _trl_dataset(tok, [prompts[i] for i in rows], [comps[i] for i in rows])
        trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data, callbacks=[Clock()])
        ds = trainer.train_dataset
        if (ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]) != (
                [prompts[i] for i in rows], [comps[i][0] for i in rows], [comps[i][1] for i in rows]):
            raise RuntimeError("TRL tokenized the pairs differently from ours: the comparison would be unfair")
        checked = [j for j, i in enumerate(rows) if i < 4 * batch_size]  # rows whose reference we computed
        trl_ref = np.array([[ds["ref_chosen_logps"][j], ds["ref_rejected_logps"][j]] for j in checked])
        ours_ref = np.array([[pairs[rows[j]].ref_chosen, pairs[rows[j]].ref_rejected] for j in checked])
        collator = trainer.data_collator

        def counting(batch_rows):
            batch = collator(batch_rows)
            widths.append(batch["input_ids"].shape[1])
            return batch

        trainer.data_collator = counting
        trainer.train()
    return {"impl": "trl", "step_s": (marks[total] - marks[warmup]) / steps,
            "mean_width": float(np.mean(widths[warmup:])), "trl_version": trl.__version__,
            "ref_logps_max_abs_diff_vs_ours": float(np.abs(trl_ref - ours_ref).max())}


def run_rw(steps: int, warmup: int, batch_size: int, K: int, rounds: int) -> dict:
    """DPO-rw vs EXO-rw through our loop: same groups, same batches, interleaved rounds."""
    tok, model, prompts, comps = setup(batch_size * (steps + warmup), K=K)
    ref = reference_logps(model, tok, prompts, comps)
    rewards = np.random.default_rng(1).normal(size=ref.shape)  # any scores: the cost does not depend on them
    groups = [Group(p, cs, r.tolist(), s.tolist()) for p, cs, r, s in zip(prompts, comps, ref, rewards)]
    collate = group_collate(tok.pad_token_id)
    cfg = train_cfg(steps + warmup, batch_size)
    hyper = {name: RW if name in RW_METHODS else resolve_preference_loss(name, {})[1] for name in GROUP_METHODS}
    times: dict[str, list[float]] = {name: [] for name in GROUP_METHODS}
    for _ in range(rounds):
        for name in times:  # interleaved: machine-load drift hits every method alike
            times[name].append(timed_loop(copy.deepcopy(model), groups, offline_loss_fn(name, hyper[name]), collate,
                                          cfg, warmup)["step_s"])
    step_s = {k: median(v) for k, v in times.items()}
    return {"impl": "rw", "K": K, "groups_per_batch": batch_size, "hyperparams": hyper, "steps": steps,
            "rounds": rounds, "step_s": step_s, "ratio_over_dpo_rw": {k: step_s[k] / step_s["dpo_rw"]
                                                                     for k in GROUP_METHODS if k != "dpo_rw"},
            "runs": times}


# every offline pair row of the loss table, and KTO on the same pairs unpaired
PAIR_METHODS = ("dpo_pref", "exo_pref", "ipo", "simpo", "kto")


def run_pairs(steps: int, warmup: int, batch_size: int, rounds: int) -> dict:
    """Each offline pair loss of the table (defaults) through our loop on the same pairs and
    batches, interleaved rounds in one process; per-step seconds and the ratio to DPO. KTO runs
    twice on the same pairs unpaired (a desirable and an undesirable example each, in the pairs'
    order): ``kto`` with 2·B examples per step, the same completions per step as the pair losses
    (the ``align`` stage's setting, ``align.hyperparams.kto.train.batch_size`` = 2 × 32), and
    ``kto_B`` with B examples per step, the convention of a per-device batch size counted in
    examples (TRL's). Its extra cost is the forward pass of the mismatched rows (no gradient)."""
    tok, model, _, _, pairs, _ = pair_data(steps + warmup, batch_size)
    unpaired = unpaired_examples(pairs, model, tok.pad_token_id, seed=0)
    runs = {name: (name, pairs, pair_collate, batch_size) for name in PAIR_METHODS if name != "kto"}
    runs |= {"kto": ("kto", unpaired, unpaired_collate, 2 * batch_size),
             "kto_B": ("kto", unpaired, unpaired_collate, batch_size)}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, (name, examples, collate, batch) in runs.items():  # interleaved: load drift hits all alike
            loss_fn = offline_loss_fn(name, resolve_preference_loss(name, {})[1])
            times[label].append(timed_loop(copy.deepcopy(model), examples, loss_fn, collate(tok.pad_token_id),
                                           train_cfg(steps + warmup, batch), warmup)["step_s"])
    step_s = {k: median(v) for k, v in times.items()}
    ratios = {k: step_s[k] / step_s["dpo_pref"] for k in runs if k != "dpo_pref"}
    return {"impl": "pairs", "pairs_per_step": batch_size, "kto_examples_per_step": {"kto": 2 * batch_size,
            "kto_B": batch_size}, "steps": steps, "rounds": rounds, "step_s": step_s, "ratio_over_dpo_pref": ratios,
            "target": "<= 1.2", "met": {k: r <= 1.2 for k, r in ratios.items()}, "runs": times}


ONLINE_METHODS = ("rloo", "grpo", "dr_grpo")  # every on-policy row of the loss table


def run_online(steps: int, warmup: int, batch_size: int, K: int, rounds: int) -> dict:
    """GRPO and Dr. GRPO vs RLOO through our loop + ``online_loss_fn`` (table defaults, K samples per
    prompt), interleaved rounds in one process; per-step seconds (sampling, reward model and
    reference scoring included), the ratio to RLOO and the mean completion length of each method's
    rollouts (the step cost grows with it)."""
    from beyondlm.align.config import RewardConfig
    from beyondlm.reward import build_reward_model
    from beyondlm.sampling import SamplingConfig

    tok, model, prompts, _ = setup(batch_size * (steps + warmup), K=1)
    reward = load_section(RewardConfig, section(read_params(ROOT / "params.yaml"), "reward"), "reward")
    rm, ref = build_reward_model(reward.model, tok).eval(), copy.deepcopy(model).eval()
    # the align stage's rollouts: pure sampling, one generate batch of all K·batch_size rows
    sampling = SamplingConfig(max_new_tokens=MAX_COMPLETION, batch_size=batch_size * K)
    collate, cfg = prompt_collate(tok.pad_token_id), train_cfg(steps + warmup, batch_size)
    times: dict[str, list[float]] = {name: [] for name in ONLINE_METHODS}
    lengths: dict[str, list[float]] = {name: [] for name in ONLINE_METHODS}
    for _ in range(rounds):
        for name in times:  # interleaved: machine-load drift hits every method alike
            stats: dict = {}
            loss_fn = online_loss_fn(name, resolve_preference_loss(name, {"K": K})[1], ref, rm, sampling=sampling,
                                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0, stats=stats)
            times[name].append(timed_loop(copy.deepcopy(model), prompts, loss_fn, collate, cfg, warmup)["step_s"])
            lengths[name].append(float(np.mean(stats["length"][warmup:])))
    step_s = {k: median(v) for k, v in times.items()}
    ratios = {k: step_s[k] / step_s["rloo"] for k in ONLINE_METHODS if k != "rloo"}
    return {"impl": "online", "K": K, "prompts_per_step": batch_size, "rollouts_per_step": K * batch_size,
            "max_new_tokens": MAX_COMPLETION, "steps": steps, "rounds": rounds, "step_s": step_s,
            "ratio_over_rloo": ratios, "target": "<= 1.1", "met": all(r <= 1.1 for r in ratios.values()),
            "mean_completion_tokens": {k: float(np.mean(v)) for k, v in lengths.items()}, "runs": times}


def machine_extras() -> dict:
    """What the measured processes ran with, on top of ``benchmarks.run.machine_info``."""
    import transformers
    import trl

    return {"torch_threads": THREADS, "transformers": transformers.__version__, "trl": trl.__version__}


def _measure(impl: str, steps: int, warmup: int, batch_size: int, extra: Sequence[str] = ()) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.align", "--impl", impl, "--steps", str(steps), "--warmup", str(warmup),
           "--batch-size", str(batch_size), "--threads", str(THREADS), *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def align_bench(steps: int = 20, warmup: int = 5, batch_size: int = 32, rounds: int = 3,
                rw_steps: int = 8, rw_batch: int = 32, K: int = 4, online_steps: int = 10,
                online_batch: int = 16) -> dict:
    """The whole bench (fresh processes); the dict written to reports/bench/align.json."""
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    t0, load_before = time.perf_counter(), os.getloadavg()
    for _ in range(rounds):  # interleaved, so drifting machine load hits both alike
        for impl in runs:
            runs[impl].append(_measure(impl, steps, warmup, batch_size))
    ours, theirs = (median(r["step_s"] for r in runs[k]) for k in ("ours", "trl"))
    rw = _measure("rw", rw_steps, 2, rw_batch, ["--K", str(K), "--rounds", str(rounds)])
    rw_ratio = rw["step_s"]["exo_rw"] / rw["step_s"]["dpo_rw"]
    pair_losses = _measure("pairs", rw_steps, 2, batch_size, ["--rounds", str(rounds)])
    online = _measure("online", online_steps, 3, online_batch, ["--K", str(K), "--rounds", str(rounds)])
    return {
        "dpo_vs_trl": {
            "conditions": {
                "model": "tiny GPT-2 of params.yaml sft.model", "vocab": runs["ours"][0]["vocab"],
                "n_params": runs["ours"][0]["n_params"], "dtype": "float32", "device": "cpu",
                "pairs_per_step": batch_size, "rows_per_step": 2 * batch_size, "prompt_tokens": PROMPT_WORDS + 1,
                "max_completion_tokens": MAX_COMPLETION, "data": "texts of the synthetic language (prompt = "
                "BOS + first 8 words; chosen/rejected = tails of two other texts); identical token ids in both",
                "batches": "identical in both: our loop's order (seed 0, no length grouping), fed to TRL in that "
                "order with train_sampling_strategy=sequential; each padded to its longest row",
                "timed_steps": steps, "warmup_steps_untimed": warmup, "rounds": rounds,
                "fresh_process_per_run": True, "threads_per_run": THREADS, "loss": "DPO sigmoid, beta=0.1",
                "reference": "precomputed, stored with the data in both (TRL precompute_ref_log_probs=True)",
                "optimizer": "AdamW fused, lr 1e-3, betas (0.9, 0.95), wd 0.01, clip 1.0, cosine, 5 warmup",
                "trl_settings": "gradient_checkpointing=False, bf16=False, optim=adamw_torch_fused, "
                "dataloader_num_workers=0, logging_steps=10, its own fused chunked LM head and metrics",
                "ours_settings": "align stage loop: group_by_length=False, no checkpoints",
            },
            "ours_step_s": ours, "trl_step_s": theirs, "ratio_ours_over_trl": ours / theirs,
            "ratio_per_round": [a["step_s"] / b["step_s"] for a, b in zip(runs["ours"], runs["trl"])],
            "target": "<= 1.0", "met": ours / theirs <= 1.0, "runs": runs,
        },
        "exo_rw_vs_dpo_rw": {**rw, "ratio_exo_over_dpo": rw_ratio, "target": "<= 1.2",
                             "met": all(r <= 1.2 for r in rw["ratio_over_dpo_rw"].values())},
        "pair_losses_vs_dpo": pair_losses,
        "online_vs_rloo": online,
        "bench_wall_s": time.perf_counter() - t0,
        "load_average": {"before": load_before, "after": os.getloadavg()},  # other jobs on the same cores
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("ours", "trl", "rw", "pairs", "online"))
    p.add_argument("--steps", type=int, default=20, help="timed steps of one DPO run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.impl is None:
        from benchmarks.run import machine_info
        from beyondlm.io import write_json

        bench = align_bench(args.steps, args.warmup, args.batch_size, args.rounds, K=args.K)
        result = {"machine": {**machine_info(), **machine_extras()}, **bench}
        write_json(ROOT / "reports" / "bench" / "align.json", result)
        print(json.dumps(result, indent=1))
        return
    if args.impl == "rw":
        result = run_rw(args.steps, args.warmup, args.batch_size, args.K, args.rounds)
    elif args.impl == "pairs":
        result = run_pairs(args.steps, args.warmup, args.batch_size, args.rounds)
    elif args.impl == "online":
        result = run_online(args.steps, args.warmup, args.batch_size, args.K, args.rounds)
    else:
        result = (run_ours if args.impl == "ours" else run_trl)(args.steps, args.warmup, args.batch_size)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
