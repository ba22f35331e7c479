"""Latent-plan experiment: train posterior + decoder, then the prior; compare with an SFT model.

Config: params section ``vq`` (:class:`VQConfig`). Steps: (1) the posterior encoder, discretizer,
up-sampler and decoder are trained jointly with ``train_loop`` on NLL/token + the discretizer's
auxiliary loss; (2) the prior is trained by MLE on the posterior's argmax codes of the training
texts; (3) metrics on the test split and on samples; (4) the same for the baseline SFT model.

Estimators (test split; a text's tokens are its targets after BOS, EOS included):
- codebook usage: perplexity exp(H(p̂)) of the empirical distribution p̂ of the argmax codes over
  all test code slots, and the number of codes never used (``quantizers.codebook_usage``);
- reconstruction NLL/token = −Σ_x log p(x | z*(x)) / Σ_x |x|, z*(x) the posterior's argmax codes;
- NLL bound/token (:func:`nll_bound`): see there;
- samples: pure ancestral z ~ p(z), x ~ p(x|z) (T = 1), scored by rep-n / distinct-n / length
  and, on the synthetic language, by the exact log p_d per token (over the possible samples;
  ``impossible_frac`` counts those p_d cannot produce). The baseline gets the same, with its
  test NLL/token on the same texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from beyondlm.config import ConfigError, TrainConfig
from beyondlm.data.prepare import load_split, load_tokenizer
from beyondlm.latent.generation import sample_plans, sample_texts
from beyondlm.latent.model import (
    LatentPlanLM,
    PlanModelConfig,
    PriorConfig,
    build_decoder,
    build_prior,
    max_plan_length,
    plan_loss,
    save_latent,
)
from beyondlm.latent.quantizers import codebook_usage
from beyondlm.logprobs import lm_targets, pad_batch, sequence_logps, token_logps
from beyondlm.metrics import perplexity, sample_metrics
from beyondlm.models import count_parameters, load_model
from beyondlm.sampling import SamplingConfig, sample
from beyondlm.training import heldout_loss, target_tokens, train_loop


@dataclass(frozen=True)
class VQConfig:
    """``vq``: the plan model, its prior, the joint training loop, evaluation and the baseline."""

    model: PlanModelConfig = field(default_factory=PlanModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-3, batch_size=64, max_steps=150,
                                                                    warmup_steps=20, ckpt_every=0))
    n_samples: int = 256  # prior → decoder samples (and as many from the baseline)
    eval_batch_size: int = 256
    max_test: int = 0  # 0 = the whole test split
    baseline: str | None = "models/sft/mle-s0"  # SFT model dir to compare with (null: none)
    seed: int = 0  # both trainings, the samples

    def __post_init__(self) -> None:
        for key, lo in (("n_samples", 1), ("eval_batch_size", 1), ("max_test", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"params.yaml: 'vq.{key}'={getattr(self, key)!r} must be >= {lo}")

    def train_config(self) -> TrainConfig:
        return replace(self.train, seed=self.seed)

    def prior_train_config(self) -> TrainConfig:
        return replace(self.prior.train, seed=self.seed)


# ----------------------------------------------------------------------------- training
def _collate(pad_id: int):
    def collate(rows):
        ids, mask = pad_batch(rows, pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def plan_loss_fn(model: LatentPlanLM, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch["input_ids"], batch["attention_mask"])
    labels, mask = lm_targets(batch["input_ids"], batch["attention_mask"])  # (B, T-1)
    return plan_loss(token_logps(out.logits, labels), mask, out.quantized.aux_loss)


def prior_loss_fn(prior, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """MLE of ``[K, z_1 … z_L, K]``: −Σ log p(z_l | z_<l) over codes and the closing EOS."""
    labels, mask = lm_targets(batch["input_ids"], batch["attention_mask"])
    logits = prior(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return -(token_logps(logits[:, :-1], labels) * mask).sum(), mask.sum()


def train_plan_model(cfg: VQConfig, tokenizer, train: Sequence, valid: Sequence, *, max_len: int,
                     live_dir: Path | None = None):
    """Joint posterior + decoder training → (model in eval mode, LoopResult); the best weights by
    the held-out loss on ``valid``."""
    torch.manual_seed(cfg.seed)
    model = LatentPlanLM(cfg.model, build_decoder(cfg.model, tokenizer, max_len), max_len)
    collate = _collate(tokenizer.pad_token_id)
    model, result = train_loop(model, train, plan_loss_fn, cfg.train_config(), collate=collate,
                               units=target_tokens(train), validate=heldout_loss(plan_loss_fn, valid, collate),
                               desc="vq posterior+decoder",
                               live_dir=live_dir / "posterior" if live_dir else None,
                               on_step=lambda step: model.set_step(step))
    return model.eval(), result


def train_prior(cfg: VQConfig, tokenizer, plans: Sequence[Sequence[int]], valid_plans: Sequence[Sequence[int]],
                *, max_codes: int, live_dir: Path | None = None):
    """The AR prior on the training texts' argmax codes → (prior in eval mode, LoopResult); the best
    weights by the held-out NLL of the validation texts' codes."""
    k = cfg.model.n_codes
    torch.manual_seed(cfg.seed)
    prior = build_prior(cfg.prior, k, max_codes, tokenizer)
    seqs = [[k, *z, k] for z in plans]
    prior, result = train_loop(prior, seqs, prior_loss_fn, cfg.prior_train_config(), collate=_collate(k),
                               units=target_tokens(seqs),
                               validate=heldout_loss(prior_loss_fn, [[k, *z, k] for z in valid_plans], _collate(k)),
                               desc="vq prior",
                               live_dir=live_dir / "prior" if live_dir else None)
    return prior.eval(), result


# ----------------------------------------------------------------------------- scoring
def _batches(seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, device):
    """Length-sorted batches: (row indices, input_ids (B, T), attention_mask (B, T))."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        yield (idx, *pad_batch([seqs[i] for i in idx], pad_id, device))


@torch.no_grad()
def posterior_scores(model: LatentPlanLM, seqs: Sequence[Sequence[int]], *, pad_id: int,
                     batch_size: int = 256, with_logps: bool = True):
    """Argmax codes of each ``[BOS] x`` and, with ``with_logps``, log p(x | z*) and |x|.

    Returns (plans: list of code lists, logp (N,) float64 or None, n_tokens (N,) long or None).
    """
    model.eval()
    device = next(model.parameters()).device
    plans: list[list[int]] = [[] for _ in seqs]
    logp, n_tok = torch.zeros(len(seqs), dtype=torch.float64), torch.zeros(len(seqs), dtype=torch.long)
    for idx, ids, attn in _batches(seqs, pad_id, batch_size, device):
        if with_logps:
            out = model(ids, attn)
            quantized, code_mask = out.quantized, out.code_mask
            labels, mask = lm_targets(ids, attn)  # (B, T-1)
            logp[idx] = (token_logps(out.logits, labels) * mask).sum(-1).double().cpu()
            n_tok[idx] = mask.sum(-1).cpu()
        else:
            quantized, code_mask = model.encode(ids, attn)
        for i, row, m in zip(idx, quantized.codes.tolist(), code_mask.sum(1).tolist()):
            plans[i] = row[:m]
    return plans, (logp if with_logps else None), (n_tok if with_logps else None)


def plan_usage(plans: Sequence[Sequence[int]], n_codes: int) -> dict[str, float]:
    """``codebook_usage`` over every code of a list of variable-length plans."""
    flat = torch.tensor([c for z in plans for c in z], dtype=torch.long)  # (Σ L,)
    return codebook_usage(flat, torch.ones_like(flat, dtype=torch.bool), n_codes)


def nll_bound(recon_logp, prior_logp, n_tokens) -> dict[str, float]:
    """Per-token reconstruction NLL, prior NLL of the argmax plans, and their sum (the bound).

    recon_logp = log p(x | z*), prior_logp = log p(z*) (codes + the prior's EOS), n_tokens = |x|,
    each (N,). The sum bounds the model's NLL −log p(x), p(x) = Σ_z p(z)·p(x|z), from above:
    p(x) ≥ p(z*)·p(x|z*) for any one plan z*, and the gap is exactly −log p(z*|x) under the
    model's own posterior. Caveat: it takes the single argmax plan z*(x), not an expectation
    over q(z|x) (it is not the ELBO, which would add q's entropy), and ignores every other plan
    that could produce x, so it can be loose. (The decoder given L codes writes at most L·2^n_down
    tokens; mass it puts on longer texts is lost, which only lowers p(x): the bound still holds.)
    """
    tokens = float(np.sum(n_tokens))
    recon, prior = -float(np.sum(recon_logp)) / tokens, -float(np.sum(prior_logp)) / tokens
    return {"recon_nll_per_token": recon, "prior_nll_per_token": prior,
            "nll_bound_per_token": recon + prior, "bound_perplexity": math.exp(recon + prior)}


def text_metrics(samples: Sequence[Sequence[int]], *, eos: int, language=None) -> dict[str, float]:
    """Surface metrics of texts (ids after BOS) and, given the synthetic language, the exact
    mean log p_d per token over the texts it can produce (EOS included) and the share it cannot."""
    out = {**sample_metrics([[t for t in s if t != eos] for s in samples]),
           "unfinished_frac": float(np.mean([not s or s[-1] != eos for s in samples]))}
    if language is not None:
        logp = language.log_prob(samples)  # (N,), −inf where p_d(x) = 0
        ok = np.isfinite(logp)
        n_ok = sum(len(s) for s, good in zip(samples, ok) if good)
        out["impossible_frac"] = float(1.0 - ok.mean())
        out["logp_data_per_token"] = float(logp[ok].sum() / n_ok) if n_ok else float("nan")
    return out


# ----------------------------------------------------------------------------- baseline
def load_baseline(path: str, tokenizer):
    """The SFT model to compare with; ConfigError if missing or over another vocabulary."""
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"params.yaml: vq.baseline={path!r} is not a model directory: run its "
                          "sft stage first (e.g. dvc repro sft@mle-0) or set vq.baseline: null")
    model = load_model(path)
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise ConfigError(f"params.yaml: vq.baseline={path!r} has another vocabulary than the "
                          "prepared data: retrain it on this data")
    return model


def baseline_metrics(model, tokenizer, test, *, n_samples: int, max_len: int, batch_size: int,
                     seed: int, language=None) -> dict:
    """Test NLL/token and the metrics of ``n_samples`` pure ancestral samples of an SFT model."""
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    logp, n_tok = sequence_logps(model, test, pad_id=pad, batch_size=batch_size)
    nll, n = float(-logp.sum()), int(n_tok.sum())
    samples = sample(model, [[bos]] * n_samples, SamplingConfig(max_new_tokens=max_len,
                     batch_size=batch_size), eos_id=eos, pad_id=pad, seed=seed)
    return {"test": {"nll_per_token": nll / n, "perplexity": perplexity(nll, n)},
            "samples": text_metrics(samples, eos=eos, language=language)}


# ----------------------------------------------------------------------------- the run
def evaluate_plan_model(model, prior, tokenizer, test, cfg: VQConfig, *, language=None) -> dict:
    """Codebook usage, reconstruction NLL and bound on ``test``; metrics of prior → decoder samples."""
    k, bs = cfg.model.n_codes, cfg.eval_batch_size
    plans, recon, n_tok = posterior_scores(model, test, pad_id=tokenizer.pad_token_id, batch_size=bs)
    prior_logp, _ = sequence_logps(prior, [[k, *z, k] for z in plans], pad_id=k, batch_size=bs)
    usage = plan_usage(plans, k)
    n_codes = sum(len(z) + 1 for z in plans)  # codes + EOS per plan
    test_metrics = {**nll_bound(recon.numpy(), prior_logp.numpy(), n_tok.numpy()),
                    "prior_nll_per_code": -float(prior_logp.sum()) / n_codes,
                    "n_texts": len(test), "n_tokens": int(n_tok.sum())}
    max_codes = max_plan_length(model.max_len, cfg.model.n_down)
    gen_plans = sample_plans(prior, cfg.n_samples, n_codes=k, max_codes=max_codes, seed=cfg.seed,
                             batch_size=bs)
    texts = sample_texts(model, gen_plans, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                         seed=cfg.seed + 1, batch_size=bs)
    samples = {**text_metrics(texts, eos=tokenizer.eos_token_id, language=language),
               "mean_plan_length": float(np.mean([len(z) for z in gen_plans]))}
    return {"codebook": usage, "test": test_metrics, "samples": samples}


def run_vq(cfg: VQConfig, data_dir: Path, *, max_len: int, out_dir: Path,
           live_dir: Path | None = None, language=None) -> dict:
    """Train, save the model dir to ``out_dir`` (safetensors), return metrics for the JSON.

    ``max_len``: prepare.max_len (targets per text incl. EOS); ``language``: the synthetic p_d
    (``prepared_data(params).language()``) for the exact sample metrics, or None.
    """
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(data_dir)
    train = load_split(data_dir, "train")["input_ids"]
    test_split = load_split(data_dir, "test")
    test = test_split["input_ids"][: cfg.max_test or None]
    if (longest := max(len(x) - 1 for x in train)) > max_len:
        raise ConfigError(f"a training text has {longest} tokens > prepare.max_len={max_len}: "
                          "the prepared data and params disagree; rerun prepare")
    baseline = load_baseline(cfg.baseline, tokenizer) if cfg.baseline else None  # fail early
    valid = load_split(data_dir, "valid")["input_ids"]
    model, loop = train_plan_model(cfg, tokenizer, train, valid, max_len=max_len, live_dir=live_dir)
    plans, valid_plans = (posterior_scores(model, seqs, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                                           with_logps=False)[0] for seqs in (train, valid))
    max_codes = max_plan_length(max_len, cfg.model.n_down)
    prior, prior_loop = train_prior(cfg, tokenizer, plans, valid_plans, max_codes=max_codes, live_dir=live_dir)
    save_latent(model, prior, tokenizer, out_dir)
    t_train = time.perf_counter()
    metrics = {"discretizer": cfg.model.discretizer, "n_codes": cfg.model.n_codes,
               "n_down": cfg.model.n_down, "max_codes": max_codes,
               "n_params": {"plan_model": count_parameters(model), "prior": count_parameters(prior)},
               "converged": loop.convergence["converged"] and prior_loop.convergence["converged"],
               "convergence": {"posterior": loop.convergence, "prior": prior_loop.convergence},
               "train": asdict(loop), "prior_train": asdict(prior_loop),
               "train_codebook": plan_usage(plans, cfg.model.n_codes)}
    if cfg.model.discretizer == "gumbel":
        metrics["final_tau"] = model.quantizer.tau
    metrics.update(evaluate_plan_model(model, prior, tokenizer, test, cfg, language=language))
    metrics["reference"] = text_metrics([x[1:] for x in test], eos=tokenizer.eos_token_id)
    if "logp_data" in test_split.column_names:  # −E_{p_d}[log p_d]/token: the floor of any NLL
        logp_d = np.asarray(test_split["logp_data"][: len(test)])
        metrics["test"]["data_entropy_rate"] = float(-logp_d.sum() / metrics["test"]["n_tokens"])
    if baseline is not None:
        metrics["baseline"] = {"dir": cfg.baseline, **baseline_metrics(
            baseline, tokenizer, test, n_samples=cfg.n_samples, max_len=max_len,
            batch_size=cfg.eval_batch_size, seed=cfg.seed, language=language)}
    metrics["wall_s"] = {"train": t_train - t0, "evaluate": time.perf_counter() - t_train}
    return metrics
