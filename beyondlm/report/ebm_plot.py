"""The EBM-SIR quality-vs-M figure, written by the ebm_eval stage (kept apart from the report
sections so that stage depends on this file only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from beyondlm.io import write_tsv
from beyondlm.report.common import save_fig


def plot_quality_vs_m(rows: list[dict], tsv: Path, png: Path, *, chance_mauve: float) -> None:
    """TSV for ``dvc plots`` and a PNG: MAUVE and each |gap| against M (log axis).

    ``chance_mauve``: MAUVE of a second plain-sampling draw, drawn as a line: how far MAUVE moves
    between two draws of the same decoder."""
    write_tsv(tsv, rows)
    cols = list(rows[0])
    Ms = [r["M"] for r in rows]
    gaps = [c for c in cols if c.startswith("gap_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(Ms, [r["mauve"] for r in rows], "o-", label="sampling (M = 1), EBM-SIR")
    axes[0].axhline(chance_mauve, ls="--", c="gray", label="second plain-sampling draw")
    axes[0].legend(fontsize=8)
    axes[0].set(xscale="log", xlabel="M (SIR candidates; 1 = plain sampling)", ylabel="MAUVE")
    for c in gaps:  # relative to M = 1 so features of different units share an axis
        base = abs(rows[0][c]) or 1.0
        axes[1].plot(Ms, [abs(r[c]) / base for r in rows], "o-", label=c[4:])
    axes[1].set(xscale="log", xlabel="M", ylabel="|gap to reference| / |gap at M=1|")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.minorticks_off()  # log axis: label exactly the Ms
        ax.set_xticks(Ms, [str(m) for m in Ms])
    save_fig(fig, png)
