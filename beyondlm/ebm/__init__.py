"""Energy-based decoding by evaluation functions (ICLR 2024): features, dual solver, SIR."""

from beyondlm.ebm.features import (
    EMBEDDERS,
    FEATURES,
    FeatureSpec,
    check_names,
    compute_features,
    continuation_logps,
)
from beyondlm.ebm.sir import sir_decode, sir_select, sir_weights
from beyondlm.ebm.solver import EBMSolution, log_p_star, solve_dual

__all__ = [
    "EBMSolution",
    "EMBEDDERS",
    "FEATURES",
    "FeatureSpec",
    "check_names",
    "compute_features",
    "continuation_logps",
    "log_p_star",
    "sir_decode",
    "sir_select",
    "sir_weights",
    "solve_dual",
]
