"""Alignment: samples with reference log-probs, preferences, reward model, DPO/EXO/RLOO, best-of-N."""
