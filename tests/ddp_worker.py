"""One small ``train_loop`` run for the multi-process tests (tests/test_distributed.py).

``train(out, ckpt, processes)`` runs in the test process (one process) or, through
``python -m torch.distributed.run --nproc_per_node N -m tests.ddp_worker --out ... --ckpt ...``,
in N gloo processes. Rank 0 writes ``weights.safetensors``, ``result.json`` and the dvclive
curves under ``out``. ``--stall-after S``: every rank sleeps after step S (rank 0 first writes
``out/stalled``), so a test can SIGKILL the run at a known point after a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from beyondlm import distributed
from beyondlm.config import TrainConfig
from beyondlm.logprobs import pad_batch
from beyondlm.sft import SFTConfig, make_loss_fn
from beyondlm.training import heldout_loss, target_tokens, train_loop
from tests.helpers import tiny_setup

STEPS, CKPT_EVERY = 6, 2


def config(processes: int) -> TrainConfig:
    # 16 sequences a step in 2 micro-batches: with 2 processes each rank takes 8 in 2 of 4 (no_sync, then sync)
    return TrainConfig(lr=1e-2, batch_size=8, grad_accum=2, max_steps=STEPS, warmup_steps=1, ckpt_every=CKPT_EVERY,
                       log_every=1, eval_every=2, processes=processes)


def train(out: Path, ckpt: Path | None, processes: int, stall_after: int = 0):
    language, tok, model = tiny_setup()
    seqs = language.sample(64, np.random.default_rng(0))
    rows = [[tok.bos_token_id, *s] for s in seqs]
    examples, valid = rows[:48], rows[48:]
    cfg = config(processes)
    loss_fn = make_loss_fn(SFTConfig(variant="mle", objective="mle", hyperparams={}, model=None, train=cfg))

    def collate(batch):
        ids, mask = pad_batch(batch, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    def stall(step):
        if step == stall_after:
            if distributed.is_main():
                (out / "stalled").write_text(str(step))
            time.sleep(600)

    out.mkdir(parents=True, exist_ok=True)
    model, result = train_loop(model, examples, loss_fn, cfg, collate=collate, units=target_tokens(examples),
                               validate=heldout_loss(loss_fn, valid, collate, min_chunks=4), ckpt_dir=ckpt,
                               live_dir=out / "live", fingerprint={"test": "ddp", "processes": processes},
                               on_step=stall if stall_after else None)
    if distributed.is_main():
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps(asdict(result)))
    return model, result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--stall-after", type=int, default=0)
    args = p.parse_args()
    train(args.out, args.ckpt, int(os.environ.get("WORLD_SIZE", "1")), args.stall_after)


if __name__ == "__main__":
    main()
