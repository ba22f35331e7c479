"""The report: ``reports/report.md`` with tables, figures, convergence verdicts and the claims table.

One section module per family: ``lm`` (SFT objectives: exact divergences, lengths, training,
bigram), ``ebm``, ``align``, ``vq``, ``knnlm``; ``convergence`` (run verdicts), ``claims`` (the
verdict rule and the SFT claims), ``build`` (assembly). Names below load their module on first use,
so ``from beyondlm.report import plot_quality_vs_m`` (the ebm_eval stage) imports only
``report/ebm_plot.py`` and ``report/common.py``, not every section.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "build_report": "build", "all_claims": "build",
    "verdict": "claims", "seed_effect": "claims", "Claim": "claims", "Effect": "claims",
    "collect": "convergence", "Verdicts": "convergence",
    "metrics_table": "lm", "plot_kl": "lm", "plot_lengths": "lm", "plot_losses": "lm",
    "ebm_section": "ebm", "plot_quality_vs_m": "ebm_plot",
    "align_section": "align", "plot_frontier": "align",
    "vq_section": "vq", "knnlm_section": "knnlm",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
