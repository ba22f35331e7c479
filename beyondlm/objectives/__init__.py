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

from beyondlm.objectives.preference import (  # noqa: E402
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_pref_loss,
    dpo_rw_loss,
    exo_pref_loss,
    exo_rw_loss,
    group_log_probs,
    pair_margin,
    preference_metrics,
    resolve_preference_loss,
)

__all__ += [
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "dpo_pref_loss",
    "dpo_rw_loss",
    "exo_pref_loss",
    "exo_rw_loss",
    "group_log_probs",
    "pair_margin",
    "preference_metrics",
    "resolve_preference_loss",
]
