"""The shared training loop (sft now; reward, align and vq plug in the same way).

Objectives plug in as ``loss_fn(model, batch) -> (loss_sum, n_units)``: the loss summed over the
micro-batch's units (tokens for SFT, pairs for preference losses) and their count. Gradients of
all micro-batches of one optimizer step are summed and divided by the step's total unit count, so
the update is the exact per-unit mean whatever the accumulation split (4×2 = 2×4 = 8×1).

What the loop owns: AdamW (no decay on biases/norms), linear warmup + cosine decay, clipping,
accumulation, devices and mixed precision (``accelerate``), seeded deterministic data order,
resumable checkpoints (``Accelerator.save_state``: safetensors weights, optimizer, scheduler and
RNG states, all re-loaded with ``weights_only=True``), per-step curves (dvclive) and a progress bar.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from dvclive import Live
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from beyondlm.config import TrainConfig
from beyondlm.io import atomic_path, write_json

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Mapping[str, Tensor]], tuple[Tensor, Tensor]]
Collate = Callable[[list], Mapping[str, Tensor]]


@dataclass(frozen=True)
class LoopResult:
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    final_loss: float
    resumed_from: int | None


class BatchOrder:
    """Deterministic example order: epoch e is ``permutation(N)`` seeded by (seed, e); optimizer
    step s takes the next ``per_step`` positions of the concatenated epochs. Resuming at step s
    is index arithmetic, no sampler state to save.

    With ``lengths``, each epoch is grouped by length (as ``Trainer``'s ``group_by_length``):
    the permutation is cut into mega-batches of ``group`` steps, sorted by length inside, cut
    into steps, and the steps shuffled — so a batch pads to about its own length, not the
    corpus maximum, while every example is still seen once per epoch.
    """

    def __init__(self, n_examples: int, per_step: int, seed: int, lengths: Sequence[int] | None = None,
                 group: int = 32):
        self.n, self.per_step, self.seed = n_examples, per_step, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group = group
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(self.n)
            if self.lengths is not None:
                order = self._grouped(order, rng)
            self._cache = {e: order}
        return self._cache[e]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mega = self.per_step * self.group
        chunks = [order[i : i + mega] for i in range(0, self.n, mega)]
        chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
        steps = [c[i : i + self.per_step] for c in chunks for i in range(0, len(c), self.per_step)]
        return np.concatenate([steps[i] for i in rng.permutation(len(steps))])

    def indices(self, step: int) -> list[int]:
        positions = range(step * self.per_step, (step + 1) * self.per_step)
        return [int(self._epoch(p // self.n)[p % self.n]) for p in positions]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused); weight decay only on matrices (embeddings, linear weights), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters (5x faster step than foreach for a tiny GPT-2 on CPU);
    # also what transformers.Trainer uses by default, so `make bench` compares loops, not optimizers.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)


class Checkpoints:
    """``<dir>/step-XXXXXXXX/`` resumable states, newest kept; ``complete.json`` when done.

    A state is resumed only if its fingerprint (params + data identity) equals the current one,
    so a rerun after a params change never continues a stale run.
    """

    def __init__(self, root: Path | None, fingerprint: Mapping):
        self.root, self.fingerprint = root, json.loads(json.dumps(fingerprint, default=str))

    def latest(self) -> Path | None:
        if self.root is None or not self.root.exists():
            return None
        for path in sorted(self.root.glob("step-*"), reverse=True):
            meta = path / "loop.json"
            if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == self.fingerprint:
                return path
            log.warning("ignoring checkpoint %s: written with other params or data", path)
        return None

    def save(self, accelerator: Accelerator, step: int, tokens: int) -> None:
        if self.root is None:
            return
        with atomic_path(self.root / f"step-{step:08d}", is_dir=True) as tmp:
            accelerator.save_state(str(tmp), safe_serialization=True)
            write_json(tmp / "loop.json", {"step": step, "tokens": tokens, "fingerprint": self.fingerprint})
        for old in self.root.glob("step-*"):
            if old.name != f"step-{step:08d}":
                shutil.rmtree(old, ignore_errors=True)

    def finish(self, result: LoopResult) -> None:
        """Drop the resumable states (the final model is saved by the caller) and mark done."""
        if self.root is None:
            return
        for old in self.root.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
        write_json(self.root / "complete.json", {**asdict(result), "fingerprint": self.fingerprint})


def _truncate_history(live_dir: Path, step: int) -> None:
    """After resuming at ``step``, drop curve rows logged after the checkpoint (they are redone)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        col = lines[0].split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        tsv.write_text("\n".join(kept) + "\n")


def train_loop(
    model: torch.nn.Module,
    examples: Sequence,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    collate: Collate,
    ckpt_dir: Path | None = None,
    live_dir: Path | None = None,
    fingerprint: Mapping | None = None,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.nn.Module, LoopResult]:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps; resume from ``ckpt_dir`` if possible."""
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpts = Checkpoints(ckpt_dir, fingerprint or {})
    lengths = [len(x) for x in examples] if cfg.group_by_length else None
    order = BatchOrder(len(examples), cfg.batch_size * cfg.grad_accum, cfg.seed, lengths)

    step, tokens, resumed = 0, 0, None
    if (state := ckpts.latest()) is not None:
        accelerator.load_state(str(state))
        meta = json.loads((state / "loop.json").read_text())
        step, tokens, resumed = meta["step"], meta["tokens"], meta["step"]
        log.info("resumed from %s (step %d)", state, step)
    live = _open_live(live_dir, resumed)

    model.train()
    t0, tokens0, losses = time.perf_counter(), tokens, []
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, mininterval=2.0,
               disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        loss, n_tok, grad_norm = _optimizer_step(model, examples, order, step, loss_fn, collate,
                                                 accelerator, optimizer, scheduler, cfg)
        step, tokens = step + 1, tokens + n_tok
        losses.append(loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rate = (tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            _log_step(live, step, float(np.mean(losses[-cfg.log_every:])), scheduler, grad_norm, rate)
            bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every:]):.4f}", refresh=False)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            ckpts.save(accelerator, step, tokens)
        if on_step is not None:
            on_step(step)
    bar.close()

    wall = time.perf_counter() - t0
    result = LoopResult(
        steps=step,
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=(tokens - tokens0) / max(wall, 1e-9),
        final_loss=float(np.mean(losses[-cfg.log_every:])) if losses else float("nan"),
        resumed_from=resumed,
    )
    if live is not None:
        live.end()
    ckpts.finish(result)
    return accelerator.unwrap_model(model), result


def _optimizer_step(model, examples, order, step, loss_fn, collate, accelerator, optimizer,
                    scheduler, cfg) -> tuple[float, int, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, tokens, grad norm)."""
    idx = order.indices(step)[accelerator.process_index :: accelerator.num_processes]
    loss_sum, units, n_tok = 0.0, 0.0, 0
    for k in range(cfg.grad_accum):
        batch = collate([examples[i] for i in idx[k * cfg.batch_size : (k + 1) * cfg.batch_size]])
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        with accelerator.autocast():
            micro_loss, micro_units = loss_fn(model, batch)
        accelerator.backward(micro_loss)  # summed; divided by the step's total units below
        loss_sum += micro_loss.item()
        units += float(micro_units)
        n_tok += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    total = accelerator.reduce(torch.tensor(units, device=accelerator.device), "sum").item()
    # DDP already averaged gradients over processes, hence the world-size factor.
    scale = accelerator.num_processes / max(total, 1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(units, 1.0), n_tok, float(grad_norm)


def _open_live(live_dir: Path | None, resumed: int | None) -> Live | None:
    if live_dir is None:
        return None
    if resumed is not None and live_dir.exists():
        _truncate_history(live_dir, resumed)
    try:
        return Live(str(live_dir), resume=resumed is not None, save_dvc_exp=False, dvcyaml=None, report=None)
    except Exception as err:  # dvclive 3.49 reads HEAD even in a git repo without commits
        log.warning("per-step curves disabled (%s): commit once in this git repo to enable them", err)
        live_dir.mkdir(parents=True, exist_ok=True)
        return None


def _log_step(live: Live | None, step: int, loss: float, scheduler, grad_norm: float, rate: float) -> None:
    if live is None:
        return
    live.step = step
    live.log_metric("train/loss", loss)
    live.log_metric("train/lr", scheduler.get_last_lr()[0])
    live.log_metric("train/grad_norm", grad_norm)
    live.log_metric("train/tokens_per_s", rate)
