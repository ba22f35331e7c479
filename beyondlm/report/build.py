"""Assemble ``reports/report.md`` (and ``reports/claims.md``, the block the README pastes) from
what the stages wrote under ``reports/``: ``metrics/**``, ``live/sft``, ``samples``, ``plots``."""

from __future__ import annotations

from pathlib import Path

from beyondlm.io import write_text
from beyondlm.report import align, claims, convergence, ebm, knnlm, lm, lookup, vq
from beyondlm.report.common import image, load_runs, read_json


def all_claims(metrics: Path, verdicts: convergence.Verdicts, knnlm_base: str | None,
               grf_base: str | None = None) -> list[claims.Claim]:
    return (claims.sft_claims(metrics, verdicts) + align.claims(metrics, verdicts) + ebm.claims(metrics, verdicts)
            + knnlm.claims(metrics, verdicts, knnlm_base) + lookup.claims(metrics, verdicts, grf_base)
            + vq.claims(metrics, verdicts))


def _data_section(prep: dict | None) -> list[str]:
    if not prep:
        return []
    t = prep.get("train", {})
    return ["## Data", "", f"Vocabulary {prep.get('vocab_size')} tokens; train {t.get('n_texts')} texts, "
            f"{t.get('n_tokens')} tokens (mean length {t.get('mean_length', 0):.1f}).", ""]


def build_report(reports: Path, n_examples: int, *, knnlm_base: str | None = None, grf_base: str | None = None) -> str:
    """Write and return the report. ``knnlm_base``: the SFT run whose hidden states are the kNN-LM's
    keys (``datastore.model``'s run name), ``grf_base`` the one GRF starts from (``grf.model``'s),
    for their convergence verdicts."""
    metrics, plots = reports / "metrics", reports / "plots" / "report"
    rows = convergence.collect(metrics)
    verdicts = convergence.Verdicts(rows)
    found = all_claims(metrics, verdicts, knnlm_base, grf_base)
    runs = load_runs(metrics / "evaluate")
    out = ["# beyondlm report", "", *_data_section(read_json(metrics / "prepare.json")),
           *claims.section(found), *convergence.section(rows), *lm.evaluation_section(runs, verdicts, reports),
           *lm.training_section(metrics), *lm.bigram_section(metrics, verdicts), *ebm.ebm_section(metrics, reports),
           *align.align_section(metrics, reports, verdicts), *vq.vq_section(metrics),
           *lookup.lookup_section(metrics, reports), *knnlm.graph_section(metrics)]
    for title, path in (("Training curves", lm.plot_losses(reports / "live" / "sft", plots / "loss.png")),
                        ("Coverage vs quality", lm.plot_kl(runs, plots / "kl.png"))):
        if path is not None:
            out += [f"## {title}", "", *image(title, path, reports)]
    if samples := lm.sample_section(reports / "samples", n_examples):
        out += ["## Samples", "", samples, ""]
    text = "\n".join(out)
    write_text(reports / "report.md", text)
    write_text(reports / "claims.md", claims.summary(found) if found else "_no claims measured yet_\n")
    return text
