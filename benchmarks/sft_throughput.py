"""One SFT throughput measurement in a fresh process (so peak RSS is this run's alone).

    python -m benchmarks.sft_throughput --impl ours|trainer --steps 100

Same tiny GPT-2 (the default `sft.model`), same synthetic data, same batch size, optimizer and
schedule; prints one JSON line: tokens/s over non-padding tokens, wall time, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import numpy as np
import torch

from beyondlm.config import ModelConfig, SFTConfig, TrainConfig, load_section, read_params, section
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


def run_ours(tok, seqs, model, cfg: TrainConfig) -> tuple[float, int]:
    sft = SFTConfig("mle", "mle", {}, ModelConfig(), cfg)

    def collate(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    warm = TrainConfig(**{**cfg.__dict__, "max_steps": WARMUP, "warmup_steps": 0})
    train_loop(model, seqs, make_loss_fn(sft), warm, collate=collate)
    _, result = train_loop(model, seqs, make_loss_fn(sft), cfg, collate=collate)
    return result.wall_s, result.tokens  # the loop itself, like the Trainer clock below


def run_trainer(tok, seqs, model, cfg: TrainConfig) -> tuple[float, int]:
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    timer = {}

    class Clock(TrainerCallback):  # time only after WARMUP steps, like ours
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARMUP:
                timer["t0"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps + WARMUP,
            learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, adam_beta2=0.95,
            logging_steps=cfg.log_every, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed,
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        )
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()])
        trainer.train()
    wall = time.perf_counter() - timer["t0"]
    mean_tokens = float(np.mean([len(s) for s in seqs]))  # Trainer samples uniformly from the same data
    return wall, int(mean_tokens * cfg.batch_size * cfg.max_steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "trainer"), required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = TrainConfig(lr=3e-3, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=10, ckpt_every=0)
    tok, seqs, model = setup()
    wall, tokens = (run_ours if args.impl == "ours" else run_trainer)(tok, seqs, model, cfg)
    print(json.dumps({
        "impl": args.impl, "steps": args.steps, "batch_size": args.batch_size, "tokens": tokens,
        "wall_s": wall, "tokens_per_s": tokens / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
