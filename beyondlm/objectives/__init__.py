"""Training objectives as pure functions of tensors."""

from beyondlm.objectives.sft import (
    OBJECTIVES,
    Objective,
    emo_cost,
    emo_loss,
    mixce_loss,
    mle_loss,
    reduce_tokens,
    resolve_objective,
    sft_token_loss,
    tailr_loss,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "emo_cost",
    "emo_loss",
    "mixce_loss",
    "mle_loss",
    "reduce_tokens",
    "resolve_objective",
    "sft_token_loss",
    "tailr_loss",
]
