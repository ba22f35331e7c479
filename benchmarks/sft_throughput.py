"""One SFT throughput measurement in a fresh process (so peak RSS is this run's alone).

    python -m benchmarks.sft_throughput --impl ours|trainer --steps 300 [--threads N]

Same tiny GPT-2 (the default `sft.model`), same synthetic data, same batch size, lr, warmup and
clipping (the `sft` section of params.yaml, so `ours` runs with the sft stage's own TrainConfig,
speed switches included), same torch threads on both sides. Trainer runs with its defaults for
these settings (length-grouped sampling, fused AdamW, cosine schedule). Prints one JSON line:
tokens/s over non-padding tokens after WARMUP untimed steps, the real-token fraction (non-pad
tokens / positions computed), wall time, peak RSS and the load average before and after.
No torch.compile: tried on this model (fixed shapes, warm cache) it gave 0.99-1.03x per step
on CPU, so it would only add compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import torch

from beyondlm.config import ModelConfig, TrainConfig, load_section, read_params, section
from beyondlm.sft import SFTConfig
from beyondlm.data import tokenization
from beyondlm.data.synthetic import LanguageSpec, SyntheticLanguage
from beyondlm.logprobs import pad_batch
from beyondlm.models import build_model
from beyondlm.sft import make_loss_fn
from beyondlm.training import train_loop

WARMUP = 5  # untimed steps: first-call allocations and kernel selection


def setup(n: int = 4000):
    """The default synthetic data and the default `sft.model` from params.yaml."""
    language = SyntheticLanguage.build(LanguageSpec())
    tok = tokenization.word_tokenizer(language.vocab)
    seqs = [[tok.bos_token_id, *s] for s in language.sample(n, np.random.default_rng(0))]
    model_cfg = load_section(ModelConfig, section(read_params("params.yaml"), "sft").get("model"), "sft.model")
    torch.manual_seed(0)
    return tok, seqs, build_model(model_cfg, tok)


def sft_train_config(steps: int) -> TrainConfig:
    """The sft stage's TrainConfig from params.yaml (batch, lr, warmup, speed switches), run for
    ``steps`` steps without checkpoints."""
    raw = section(read_params("params.yaml"), "sft").get("train") or {}
    return load_section(TrainConfig, {**raw, "max_steps": steps, "ckpt_every": 0, "eval_every": 0,
                                      "warmup_steps": min(raw.get("warmup_steps", 0), steps)}, "sft.train")


class Positions:
    """Counts non-pad tokens and computed positions of the batches a collate function returns."""

    def __init__(self):
        self.real = self.positions = 0

    def count(self, batch) -> None:
        self.real += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()

    def fraction(self) -> float:
        return self.real / max(self.positions, 1)


def run_ours(tok, seqs, model, cfg: TrainConfig) -> tuple[float, int, float]:
    sft = SFTConfig("mle", "mle", {}, ModelConfig(), cfg)
    counter = Positions()

    def collate(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        counter.count(batch)
        return batch

    warm = TrainConfig(**{**cfg.__dict__, "max_steps": WARMUP, "warmup_steps": 0})
    train_loop(model, seqs, make_loss_fn(sft), warm, collate=collate)
    counter.__init__()
    _, result = train_loop(model, seqs, make_loss_fn(sft), cfg, collate=collate)
    return result.wall_s, result.tokens, counter.fraction()  # the loop itself, like the Trainer clock below


def run_trainer(tok, seqs, model, cfg: TrainConfig) -> tuple[float, int, float]:
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    timer = {}
    counter = Positions()

    class Clock(TrainerCallback):  # time only after WARMUP steps, like ours
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARMUP:
                timer["t0"] = time.perf_counter()
                counter.__init__()

    class Counting(DataCollatorForLanguageModeling):
        def __call__(self, features, *a, **kw):
            batch = super().__call__(features, *a, **kw)
            counter.count(batch)
            return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps + WARMUP,
            learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, adam_beta2=0.95,
            logging_steps=cfg.log_every, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed,
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        )
        collator = Counting(tok, mlm=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()])
        trainer.train()
    wall = time.perf_counter() - timer["t0"]
    return wall, counter.real, counter.fraction()  # the batches of the timed steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "trainer"), required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both sides alike)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = sft_train_config(args.steps)
    tok, seqs, model = setup()
    wall, tokens, real_fraction = (run_ours if args.impl == "ours" else run_trainer)(tok, seqs, model, cfg)
    print(json.dumps({
        "impl": args.impl, "steps": args.steps, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
        "skip_pad_mask": cfg.skip_pad_mask if args.impl == "ours" else None, "tokens": tokens,
        "wall_s": wall, "tokens_per_s": tokens / wall, "real_token_fraction": real_fraction,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }))


if __name__ == "__main__":
    main()
