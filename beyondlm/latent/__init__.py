"""Latent plans with discrete codes (EMNLP'21): posterior codes → plan → causal LM; AR prior."""

from beyondlm.latent.experiment import VQConfig, nll_bound, run_vq, text_metrics
from beyondlm.latent.generation import sample_plans, sample_texts
from beyondlm.latent.model import (
    LatentPlanLM,
    PlanModelConfig,
    PriorConfig,
    decoder_logits,
    load_latent,
    plan_lengths,
    plan_loss,
    save_latent,
)
from beyondlm.latent.quantizers import (
    DISCRETIZERS,
    GumbelConfig,
    GumbelQuantizer,
    NearestConfig,
    NearestQuantizer,
    codebook_usage,
    commitment_loss,
    ema_update,
    gumbel_tau,
    mean_code_entropy,
    mean_slot_entropy,
)

__all__ = [
    "DISCRETIZERS",
    "GumbelConfig",
    "GumbelQuantizer",
    "LatentPlanLM",
    "NearestConfig",
    "NearestQuantizer",
    "PlanModelConfig",
    "PriorConfig",
    "VQConfig",
    "codebook_usage",
    "commitment_loss",
    "decoder_logits",
    "ema_update",
    "gumbel_tau",
    "load_latent",
    "mean_code_entropy",
    "mean_slot_entropy",
    "nll_bound",
    "plan_lengths",
    "plan_loss",
    "run_vq",
    "sample_plans",
    "sample_texts",
    "save_latent",
    "text_metrics",
]
