"""The shared training loop (sft now; reward, align and vq plug in the same way).

Objectives plug in as ``loss_fn(model, batch) -> (loss_sum, n_units)``: the loss summed over the
micro-batch's units (tokens for SFT, pairs for preference losses) and their count. Gradients of
all micro-batches of one optimizer step are summed and divided by one normaliser per step, so the
update does not depend on the accumulation split (4×2 = 2×4 = 8×1).

The normaliser is a constant when ``units`` (each example's unit count, e.g. its target tokens)
is given: the expected units of a step, ``per_step · mean(units)``. Dividing by the step's *own*
count instead weights every token by 1/(tokens in its batch): with length-grouped batches a short
text's tokens then weigh several times a long text's, and the model learns to stop early
(shared/METHODS.md, "Training objective vs batching"). With the constant, the steps of an epoch
add up to exactly the full-corpus token-mean gradient, whatever the grouping. Losses with one unit
per example (pairs, groups) have a constant count anyway.

Convergence: with ``validate(model, step)`` (a held-out loss, lower is better) the loop evaluates at step 0,
every ``cfg.eval_interval`` steps and at the end, logs the curve (dvclive ``valid/loss``), keeps
the best weights and returns them with the verdict of :mod:`beyondlm.convergence`.

What the loop owns: AdamW (no decay on biases/norms), linear warmup + cosine decay, clipping,
accumulation, devices and mixed precision (``accelerate``), seeded deterministic data order,
resumable checkpoints (``Accelerator.save_state``: safetensors weights, optimizer, scheduler and
RNG states, all re-loaded with ``weights_only=True``), per-step curves (dvclive) and a progress bar.

Several processes (``cfg.processes`` > 1, under torchrun: :mod:`beyondlm.distributed`): every
rank walks the same :class:`BatchOrder` and takes every N-th sequence of each step's global batch
(N = processes; the batch stays ``batch_size · grad_accum`` sequences, so the run is the same
optimisation as with one process). Each rank sums its shard's losses; DDP (``accelerator.prepare``)
all-reduces the gradients as a *mean* over ranks, so the step multiplies them by N / normaliser:
(1/N) Σ_r Σ_{i ∈ shard r} ∇ℓ_i · N / U = Σ_i ∇ℓ_i / U, the one-process gradient of the same batch
under the same fixed normaliser U. Validation runs on rank 0 with the plain model and its value is
broadcast, so every rank keeps the same best weights and verdict; rank 0 picks the checkpoint to
resume, writes the curves and the checkpoint files (each rank adds its RNG state to the same
directory before rank 0 renames it into place). One process runs exactly the code path of before.
"""

from __future__ import annotations

import contextlib
import json
import math
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

from beyondlm import convergence, distributed
from beyondlm.convergence import HeldOutValue
from beyondlm.config import TrainConfig
from beyondlm.inputs import InputError, check_safetensors, check_torch_file, read_json, require
from beyondlm.io import atomic_path, split_timing, write_json

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Mapping[str, Tensor]], tuple[Tensor, Tensor]]
Collate = Callable[[list], Mapping[str, Tensor]]
Validate = Callable[[torch.nn.Module, int], "float | HeldOutValue"]  # (model, step) -> held-out loss
BEST = "best.safetensors"


@dataclass(frozen=True)
class LoopResult:
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    final_loss: float
    resumed_from: int | None
    normaliser: float | None = None  # units per step the summed loss was divided by (None: its own count)
    valid_curve: list | None = None  # [(step, held-out loss)], with ``validate``
    convergence: dict | None = None  # beyondlm.convergence.Verdict as a dict, with ``validate``
    device: str = "cpu"  # the device type that trained (accelerate's choice: cuda if there is one)
    mixed_precision: str = "no"  # the precision that ran: no | fp16 | bf16 (autocast on)


class BatchOrder:
    """Deterministic example order: epoch e is ``permutation(N)`` seeded by (seed, e); optimizer
    step s takes the next ``per_step`` positions of the concatenated epochs. Resuming at step s
    is index arithmetic, no sampler state to save.

    With ``lengths``, each epoch is grouped by length (as ``Trainer``'s ``group_by_length``):
    the permutation is cut into mega-batches of ``group`` steps, sorted by length inside, cut
    into steps, and the steps shuffled — so a batch pads to about its own length, not the
    corpus maximum, while every example is still seen once per epoch. The cuts follow the global
    step grid (an epoch of N % per_step ≠ 0 starts mid-step), else every step of the next epoch
    would join halves of two sorted steps.
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
                # the epoch's first ``head`` positions finish a step begun in the previous epoch;
                # grouping starts at the next step boundary, so sorted steps stay whole steps
                head = (-e * self.n) % self.per_step
                order = np.concatenate([order[:head], self._grouped(order[head:], rng)])
            self._cache = {e: order}
        return self._cache[e]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mega = self.per_step * self.group
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
        steps = [c[i : i + self.per_step] for c in chunks for i in range(0, len(c), self.per_step)]
        tail = [steps.pop()] if steps and len(steps[-1]) < self.per_step else []  # completed by the next epoch
        return np.concatenate([steps[i] for i in rng.permutation(len(steps))] + tail)

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


def right_padded(mask: Tensor) -> bool:
    """True if every row of a 0/1 ``attention_mask`` (B, T) is ones then zeros, starting with a one."""
    return mask.dim() == 2 and bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all()) \
        and bool((mask <= 1).all())


class CausalNoPadMask:
    """Calls a causal LM without the attention mask of right-padded batches.

    Under causal attention a real token at position t sees keys 0..t, all real when padding is on
    the right, so dropping the mask leaves every real position's output unchanged (pad positions
    change, and every loss masks them). What it saves: HF builds a 4-D mask per forward and SDPA
    takes its slower masked path; with ``is_causal`` the kernel also skips the upper triangle.
    Measured on the default sft model (B=64, 2 threads): ~9% per step. Everything but the call
    (``config``, ``get_output_embeddings`` ...) is the wrapped model's.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args, attention_mask: Tensor | None = None, **kwargs):
        if attention_mask is not None and right_padded(attention_mask):
            attention_mask = None
        return self.model(*args, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class SyncedForward:
    """What ``loss_fn`` calls under DDP: calls go through the DDP wrapper (its gradient hooks),
    every attribute (``config``, ``get_output_embeddings``, ``generate``, ``train`` ...) is the
    plain model's, as with one process."""

    def __init__(self, ddp: torch.nn.Module, module: torch.nn.Module):
        self.ddp, self.module = ddp, module

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def _skip_pad_mask_ok(model: torch.nn.Module, loss_fn: LossFn, batch: Mapping[str, Tensor]) -> bool:
    """Whether :class:`CausalNoPadMask` is exact for this model and loss: a decoder-only HF model,
    and on ``batch`` the loss (sum and units) with and without the mask agree. Checked in eval
    mode, without gradients and with the RNG state restored, so training is not perturbed."""
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None or config.is_encoder_decoder \
            or getattr(config, "is_causal", True) is False or "attention_mask" not in batch:
        return False
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            ref_loss, ref_units = loss_fn(model, batch)
            loss, units = loss_fn(CausalNoPadMask(model), batch)
        ok = float(units) == float(ref_units) and bool(torch.isclose(loss, ref_loss, rtol=1e-4, atol=1e-4))
    except Exception as err:  # a model that cannot run without the mask: keep the masked path
        log.info("skip_pad_mask: not used (%s)", err)
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        log.info("skip_pad_mask: the loss changes without the padding mask here; keeping it")
    return ok


class Checkpoints:
    """``<dir>/step-XXXXXXXX/`` resumable states, newest kept; ``complete.json`` when done.

    A state is resumed only if its fingerprint (params + data identity) equals the current one,
    so a rerun after a params change never continues a stale run. Beside the accelerate state a
    checkpoint holds the held-out curve so far (``loop.json``) and the best weights (``BEST``).
    A state that cannot be read (a truncated weights or optimizer file, a corrupt ``loop.json``)
    is moved aside to ``<name>.bad`` with a warning; the run resumes from an earlier state or
    starts over, rather than failing on every rerun.
    """

    STATE_FILES = ("loop.json", "model.safetensors", "optimizer.bin", "scheduler.bin")  # what save() writes

    def __init__(self, root: Path | None, fingerprint: Mapping):
        self.root, self.fingerprint = root, json.loads(json.dumps(fingerprint, default=str))

    def latest(self) -> Path | None:
        """The newest readable state of this fingerprint; rank 0 decides (and moves bad ones
        aside), every rank gets its answer."""
        path = self._latest() if distributed.is_main() else None
        return None if (path := distributed.broadcast(None if path is None else str(path))) is None else Path(path)

    def _latest(self) -> Path | None:
        if self.root is None or not self.root.exists():
            return None
        for path in sorted(self.root.glob("step-*"), reverse=True):
            if path.suffix == ".bad":
                continue
            bad = path.with_name(f"{path.name}.bad")
            try:
                meta = self._readable(path, f"moved aside to {bad.name}; resuming from an earlier state or step 0")
            except InputError as err:
                log.warning("unreadable checkpoint: %s", err)
                shutil.rmtree(bad, ignore_errors=True)
                path.rename(bad)
                continue
            if meta.get("fingerprint") == self.fingerprint:
                return path
            log.warning("ignoring checkpoint %s: written with other params or data", path)
        return None

    def _readable(self, path: Path, fix: str) -> dict:
        """``loop.json`` of the state ``path`` once every file in it reads (InputError if not):
        the checks run before ``load_state``, which would have loaded the weights already when
        the optimizer file turns out truncated."""
        for name in self.STATE_FILES:
            require(path / name, "checkpoint file", fix)
        meta = read_json(path / "loop.json", fix)
        if not isinstance(meta, dict) or not {"step", "tokens"} <= set(meta):
            raise InputError(path / "loop.json", "is not a checkpoint record", fix)
        for file in sorted(path.iterdir()):
            if file.suffix == ".safetensors":
                check_safetensors(file, fix)
            elif file.suffix in (".bin", ".pkl"):  # torch.save zip archives
                check_torch_file(file, fix)
        return meta

    def save(self, accelerator: Accelerator, step: int, tokens: int, tracker: "HeldOut") -> None:
        """Every rank calls it: rank 0 makes the temporary directory, each rank saves its part
        (rank 0 the weights, optimizer and scheduler; each its RNG state), rank 0 renames it."""
        if self.root is None:
            return
        main = accelerator.is_main_process
        with atomic_path(self.root / f"step-{step:08d}", is_dir=True) if main else contextlib.nullcontext() as tmp:
            tmp = Path(distributed.broadcast(str(tmp) if main else None))
            accelerator.save_state(str(tmp), safe_serialization=True)
            if main:
                tracker.save(tmp)
                write_json(tmp / "loop.json", {"step": step, "tokens": tokens, "fingerprint": self.fingerprint,
                                               "valid_curve": tracker.curve,
                                               "valid_chunks": {s: [c.sums, c.units] for s, c in tracker.chunks.items()}})
            distributed.barrier()  # every rank's files are in before the rename
        if not main:
            return
        for old in self.root.glob("step-*"):
            if old.name != f"step-{step:08d}":
                shutil.rmtree(old, ignore_errors=True)

    def finish(self, result: LoopResult) -> None:
        """Drop the resumable states (the final model is saved by the caller) and mark done."""
        if self.root is None or not distributed.is_main():
            return
        for old in self.root.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
        kept, _ = split_timing(asdict(result))  # persisted out: the same bytes for the same work
        write_json(self.root / "complete.json", {**kept, "fingerprint": self.fingerprint})


class HeldOut:
    """The held-out curve of one run and a CPU copy of its best weights."""

    def __init__(self, validate: Validate | None, cfg: TrainConfig):
        self.validate, self.cfg = validate, cfg
        self.curve: list[tuple[int, float]] = []
        self.chunks: dict[int, HeldOutValue] = {}  # step -> per-chunk parts, when validate gives them
        self.best: dict[str, Tensor] | None = None

    def due(self, step: int) -> bool:
        return self.validate is not None and (step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps) \
            and all(s != step for s, _ in self.curve)

    def evaluate(self, model: torch.nn.Module, step: int) -> float:
        """``model``: the plain model (not DDP's wrapper, whose forward is a collective). Rank 0
        validates and every rank gets its value, so all keep the same best weights."""
        result = None
        if distributed.is_main():
            model.eval()
            with torch.no_grad():
                result = self.validate(model, step)
            model.train()
        result = distributed.broadcast(result)
        if isinstance(result, HeldOutValue):
            self.chunks[step] = result
        value = float(result.value if isinstance(result, HeldOutValue) else result)
        if not self.curve or value < min(v for _, v in self.curve):
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.curve.append((step, value))
        return value

    def save(self, directory: Path) -> None:
        if self.best is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.best.items()}, str(directory / BEST))

    def load(self, directory: Path, meta: Mapping) -> None:
        self.curve = [(int(s), float(v)) for s, v in meta.get("valid_curve") or []]
        self.chunks = {int(s): HeldOutValue.from_chunks(*c) for s, c in (meta.get("valid_chunks") or {}).items()}
        if (directory / BEST).exists():
            from safetensors.torch import load_file

            self.best = load_file(str(directory / BEST))

    def restore_best(self, model: torch.nn.Module) -> int | None:
        """Load the best weights into ``model``; the step they come from (None without a curve)."""
        if not self.curve:
            return None
        step = min(self.curve, key=lambda p: (p[1], p[0]))[0]
        if step != self.curve[-1][0]:
            if self.best is None:
                raise RuntimeError("the best held-out weights were not kept (checkpoint without best.safetensors)")
            model.load_state_dict(self.best)
        return step

    def verdict(self) -> dict | None:
        if self.validate is None:
            return None
        return convergence.verdict(self.curve, tol=self.cfg.converge_tol, chunks=self.chunks).to_dict()


def _truncate_history(live_dir: Path, step: int) -> None:
    """After resuming at ``step``, drop curve rows logged after the checkpoint (they are redone)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        col = lines[0].split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        tsv.write_text("\n".join(kept) + "\n")


def heldout_loss(loss_fn: LossFn, examples: Sequence, collate: Collate, batch_size: int = 256,
                 min_chunks: int = 32) -> Validate:
    """``validate(model, step)``: the training objective itself on held-out ``examples`` (Σ loss /
    Σ units over length-sorted chunks), so each run is judged by what it optimises. The chunks
    (at most ``batch_size`` examples, at least ``min_chunks`` of them when there are as many
    examples) come back too: the convergence verdict compares a gain with their paired noise."""
    examples = as_list(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    size = max(1, min(batch_size, math.ceil(len(order) / min_chunks)))

    def validate(model: torch.nn.Module, step: int | None = None) -> HeldOutValue:
        device = next(model.parameters()).device
        sums, units = [], []
        for lo in range(0, len(order), size):
            batch = collate([examples[i] for i in order[lo : lo + size]])
            loss, n = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
            sums.append(float(loss))
            units.append(float(n))
        return HeldOutValue.from_chunks(sums, units)

    return validate


def as_list(examples: Sequence) -> list:
    """``examples`` as a Python list: a ``datasets`` column converts rows from Arrow on every
    index (~0.1 ms a row, several ms a step), so the loop converts it once."""
    return examples if isinstance(examples, list) else list(examples)


def target_tokens(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Units of a next-token loss on ``[BOS] x``: every position after the first."""
    return [len(s) - 1 for s in seqs]


def train_loop(
    model: torch.nn.Module,
    examples: Sequence,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    collate: Collate,
    units: Sequence[float] | None = None,
    validate: Validate | None = None,
    ckpt_dir: Path | None = None,
    live_dir: Path | None = None,
    fingerprint: Mapping | None = None,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.nn.Module, LoopResult]:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps; resume from ``ckpt_dir`` if possible.

    ``units``: each example's unit count (e.g. :func:`target_tokens`); the loss is then divided by
    the constant expected units per step, an unbiased estimate of the corpus mean whatever the
    batching. ``validate(model, step) -> held-out loss``: tracked along training; the best weights are
    returned (``result.convergence`` has the verdict). Under torchrun every rank calls it with
    the same arguments (module docstring: several processes).
    """
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, **_multi_process_options(cfg.processes))
    optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    if accelerator.num_processes != cfg.processes:
        raise RuntimeError(f"train.processes={cfg.processes} but {accelerator.num_processes} processes run: "
                           f"start the stage plainly (beyondlm.distributed.relaunch starts its workers)")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    module = accelerator.unwrap_model(model)  # `model` itself with one process; DDP's wrapped module otherwise
    ckpts = Checkpoints(ckpt_dir, fingerprint or {})
    examples = as_list(examples)
    lengths = [len(x) for x in examples] if cfg.group_by_length else None
    per_step = cfg.batch_size * cfg.grad_accum
    order = BatchOrder(len(examples), per_step, cfg.seed, lengths)
    if units is not None and len(units) != len(examples):
        raise ValueError(f"units has {len(units)} entries for {len(examples)} examples")
    normaliser = per_step * float(np.mean(units)) if units is not None else None
    held_out = HeldOut(validate, cfg)

    step, tokens, resumed = 0, 0, None
    if (state := ckpts.latest()) is not None:
        accelerator.load_state(str(state))
        meta = json.loads((state / "loop.json").read_text())
        step, tokens, resumed = meta["step"], meta["tokens"], meta["step"]
        held_out.load(state, meta)
        log.info("resumed from %s (step %d)", state, step)
    live = _open_live(live_dir if accelerator.is_main_process else None, resumed)
    model.train()
    if held_out.due(step):
        _log_valid(live, step, held_out.evaluate(module, step))

    forward = model if accelerator.num_processes == 1 else SyncedForward(model, module)
    if cfg.skip_pad_mask and step < cfg.max_steps:
        first = collate([examples[i] for i in order.indices(step)[: cfg.batch_size]])
        if _skip_pad_mask_ok(module, loss_fn, {k: v.to(accelerator.device) for k, v in first.items()}):
            forward = CausalNoPadMask(forward)

    t0, tokens0, losses = time.perf_counter(), tokens, []
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, mininterval=2.0,
               disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        idx = order.indices(step)
        loss, n_tok, grad_norm = _optimizer_step(model, forward, examples, idx, loss_fn, collate, accelerator,
                                                 optimizer, scheduler, cfg, normaliser, units)
        step, tokens = step + 1, tokens + n_tok
        losses.append(loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            _log_step(live, step, float(np.mean(losses[-cfg.log_every:])), scheduler, grad_norm)
            bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every:]):.4f}", refresh=False)
        if held_out.due(step):
            _log_valid(live, step, held_out.evaluate(module, step))
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            ckpts.save(accelerator, step, tokens, held_out)
        if on_step is not None:
            on_step(step)
    bar.close()

    wall = time.perf_counter() - t0
    verdict = held_out.verdict()
    best_step = held_out.restore_best(module)
    if verdict is not None and best_step != step:
        log.info("%s: keeping the best held-out checkpoint (step %d of %d)", desc, best_step, step)
    result = LoopResult(
        steps=step,
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=(tokens - tokens0) / max(wall, 1e-9),
        final_loss=float(np.mean(losses[-cfg.log_every:])) if losses else float("nan"),
        resumed_from=resumed,
        normaliser=normaliser,
        valid_curve=[list(p) for p in held_out.curve] if validate is not None else None,
        convergence=verdict,
        device=accelerator.device.type,
        mixed_precision=accelerator.mixed_precision if accelerator.native_amp else "no",
    )
    if live is not None:
        live.end()
    ckpts.finish(result)
    return module, result


def _multi_process_options(processes: int) -> dict:
    """``Accelerator`` options for several processes (none for one: its defaults, as before).
    ``cpu``: accelerate runs several CPU processes (gloo) only when told so. ``split_batches``:
    each step's batch is the global one split over the processes, so the prepared scheduler
    steps once per optimizer step (by default accelerate steps it once per process)."""
    if processes == 1:
        return {}
    from accelerate import DataLoaderConfiguration

    return {"cpu": not torch.cuda.is_available(), "dataloader_config": DataLoaderConfiguration(split_batches=True)}


def _optimizer_step(model, forward, examples, idx, loss_fn, collate, accelerator, optimizer, scheduler, cfg,
                    normaliser: float | None, units: Sequence[float] | None) -> tuple[float, int, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, tokens, grad norm).

    ``forward`` is what ``loss_fn`` calls: ``model`` itself, a :class:`SyncedForward` of DDP's
    wrapper, or a :class:`CausalNoPadMask` of either. The loss is kept as a tensor until the step
    ends (one host read per step, not per micro-batch). With N processes this rank takes every
    N-th sequence of the step (length-sorted steps: every rank gets long and short ones) in
    ``grad_accum`` micro-batches of about batch_size / N; gradients are all-reduced once, at its
    last micro-batch (``no_sync`` before). With one process the slices are exactly batch_size.
    """
    n_proc = accelerator.num_processes
    mine = idx[accelerator.process_index :: n_proc]
    size = -(-len(mine) // cfg.grad_accum)  # = cfg.batch_size with one process
    micro = [mine[lo : lo + size] for lo in range(0, len(mine), size)]
    loss_sum, n_units, n_tok = torch.zeros((), device=accelerator.device), 0.0, 0
    for k, rows in enumerate(micro):
        batch = collate([examples[i] for i in rows])
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        # DDP decides in forward whether the backward all-reduces: both sit inside no_sync
        with accelerator.no_sync(model) if k < len(micro) - 1 else contextlib.nullcontext():
            with accelerator.autocast():
                micro_loss, micro_units = loss_fn(forward, batch)
            accelerator.backward(micro_loss)  # summed; divided by the step's normaliser below
        loss_sum += micro_loss.detach()
        n_units += float(micro_units)
        n_tok += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    total, step_loss = n_units, None
    if n_proc > 1:  # the step's loss, units and tokens over all ranks (one all-reduce)
        parts = torch.tensor([float(loss_sum), n_units, float(n_tok)], dtype=torch.float64, device=accelerator.device)
        step_loss, total, n_tok = accelerator.reduce(parts, "sum").tolist()
        step_loss, n_tok = step_loss / max(total, 1.0), int(n_tok)
    if units is not None and abs(total - sum(units[i] for i in idx)) > 0.5:
        raise RuntimeError(f"loss_fn counted {total:g} units in a step whose examples have "
                           f"{sum(units[i] for i in idx):g}: the units passed to train_loop are wrong")
    # DDP averaged the ranks' summed gradients: × N makes them the sum over the global batch.
    scale = n_proc / (normaliser if normaliser is not None else max(total, 1.0))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)  # one kernel for all parameters
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if step_loss is None:
        step_loss = float(loss_sum) / max(n_units, 1.0)
    return step_loss, n_tok, float(grad_norm)


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


def _log_valid(live: Live | None, step: int, value: float) -> None:
    if live is not None:
        live.step = step
        live.log_metric("valid/loss", value)


def _log_step(live: Live | None, step: int, loss: float, scheduler, grad_norm: float) -> None:
    """Curves of the work only: a rate would change the tracked files on every rerun."""
    if live is None:
        return
    live.step = step
    live.log_metric("train/loss", loss)
    live.log_metric("train/lr", scheduler.get_last_lr()[0])
    live.log_metric("train/grad_norm", grad_norm)
