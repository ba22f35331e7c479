"""Assemble ``reports/report.md`` (and ``reports/claims.md``, the block the README pastes) from
what the stages wrote under ``reports/``: ``metrics/**``, ``live/sft``, ``samples``, ``plots``."""

from __future__ import annotations

from pathlib import Path

from beyondlm.io import write_text
from beyondlm.report import align, claims, convergence, ebm, knnlm, lm, lookup, vq
from beyondlm.report.common import image, load_runs, read_json, reading_only
from beyondlm.report.provenance import Provenance


def all_claims(metrics: Path, verdicts: convergence.Verdicts, knnlm_base: str | None,
               grf_base: str | None = None, align_base: str | None = None) -> list[claims.Claim]:
    return (claims.sft_claims(metrics, verdicts) + align.claims(metrics, verdicts, align_base)
            + ebm.claims(metrics, verdicts)
            + knnlm.claims(metrics, verdicts, knnlm_base) + lookup.claims(metrics, verdicts, grf_base)
            + vq.claims(metrics, verdicts))


def _data_section(prep: dict | None, oracle: dict | None) -> list[str]:
    """Sizes of the prepared data, texts cut at max_len, and what r* (the oracle reward) is."""
    if not prep:
        return []
    t = prep.get("train", {})
    out = ["## Data", "", f"Vocabulary {prep.get('vocab_size')} tokens; train {t.get('n_texts')} texts, "
           f"{t.get('n_tokens')} tokens (mean length {t.get('mean_length', 0):.1f})"
           + (f"; {t['truncated_frac']:.1%} of them cut at prepare.max_len" if "truncated_frac" in t else "") + ".", ""]
    if oracle and oracle.get("kind") == "classifier":
        out += [f"Oracle reward r*: a sentiment classifier's log-odds (TF-IDF + logistic regression), test accuracy "
                f"{oracle['test_accuracy']:.3f} on {oracle['n_test']} held-out labelled texts.", ""]
    elif oracle and oracle.get("kind") == "none":
        out += ["No oracle reward r* (oracle.kind: none): the preferences are the data's own labels, and every "
                "reward and win rate below is the learned reward model's judgement (RM).", ""]
    elif oracle:
        out += ["Oracle reward r*: the synthetic language's exact posterior log-odds of positive sentiment.", ""]
    return out


def _stamped(lines: list[str], provenance: Provenance | None, stages: tuple[str, ...]) -> list[str]:
    """A section's lines with its provenance line under the heading."""
    if not lines or provenance is None:
        return lines
    return [*lines[:2], *provenance.line(stages), *lines[2:]]


def build_report(reports: Path, n_examples: int, *, knnlm_base: str | None = None, grf_base: str | None = None,
                 align_base: str | None = None, provenance: Provenance | None = None) -> str:
    """Write and return the report. ``knnlm_base``: the SFT run whose hidden states are the kNN-LM's
    keys (``datastore.model``'s run name), ``grf_base`` the one GRF starts from (``grf.model``'s),
    ``align_base`` π_sft of every alignment method (``align_sample.base``), for their convergence verdicts. ``provenance``: read only the current pipeline's outputs and
    name each section's data, params and code (None: every file, no provenance lines)."""
    with reading_only(provenance.is_current if provenance is not None else None):
        text, found = _build(reports, n_examples, knnlm_base, grf_base, align_base, provenance)
    write_text(reports / "report.md", text)
    write_text(reports / "claims.md", claims.summary(found) if found else "_no claims measured yet_\n")
    return text


def _build(reports: Path, n_examples: int, knnlm_base: str | None, grf_base: str | None, align_base: str | None,
           prov: Provenance | None) -> tuple[str, list[claims.Claim]]:
    metrics, plots = reports / "metrics", reports / "plots" / "report"
    rows = convergence.collect(metrics)
    verdicts = convergence.Verdicts(rows)
    found = all_claims(metrics, verdicts, knnlm_base, grf_base, align_base)
    runs = load_runs(metrics / "evaluate")
    out = ["# beyondlm report", "",
           *_stamped(_data_section(read_json(metrics / "prepare.json"), read_json(metrics / "oracle.json")), prov,
                     ("prepare", "oracle")),
           *claims.section(found), *convergence.section(rows),
           *_stamped(lm.evaluation_section(runs, verdicts, reports), prov, ("sft", "evaluate")),
           *_stamped(lm.training_section(metrics), prov, ("sft",)),
           *_stamped(lm.bigram_section(metrics, verdicts), prov, ("bigram",)),
           *_stamped(ebm.ebm_section(metrics, reports), prov, ("ebm", "ebm_eval")),
           *_stamped(align.align_section(metrics, reports, verdicts), prov,
                     ("align_sample", "preferences", "reward", "align", "best_of_n")),
           *_stamped(vq.vq_section(metrics), prov, ("vq",)),
           *_stamped(lookup.lookup_section(metrics, reports), prov, ("datastore", "knnlm", "grf")),
           *_stamped(knnlm.graph_section(metrics), prov, ("graph",))]
    for title, path in (("Training curves", lm.plot_losses(reports / "live" / "sft", plots / "loss.png")),
                        ("Coverage vs quality", lm.plot_kl(runs, plots / "kl.png"))):
        if path is not None:
            out += [f"## {title}", "", *image(title, path, reports)]
    if samples := lm.sample_section(reports / "samples", n_examples):
        out += ["## Samples", "", samples, ""]
    if prov is not None:
        out += prov.left_out_section()
    return "\n".join(out), found
