"""Stage ``report``: ``reports/report.md`` (tables, PNG figures, convergence verdicts, the claims
table) and ``reports/claims.md`` (the claims block the README pastes), from every stage's outputs.

params: report.*, datastore.model, grf.model, align_sample.base (the SFT runs kNN-LM interpolates, GRF
        starts from and every policy starts from: their convergence verdicts)
deps:   reports/metrics, reports/live/sft, reports/samples, reports/plots/ebm/quality_vs_m.png; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   reports/report.md, reports/claims.md, reports/plots/report/

Only the outputs of the stages dvc.yaml defines now, with the bytes dvc.lock recorded, are read;
each section names its data source, params hash and code commit (beyondlm/report/provenance.py).
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.config import ReportConfig, load_section, read_params, section
from beyondlm.dvcgraph import pipeline_stages
from beyondlm.report.build import build_report
from beyondlm.report.provenance import Provenance


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    return argparse.ArgumentParser(description=__doc__)


def configure(args: argparse.Namespace, params: dict) -> ReportConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(ReportConfig, section(params, "report"), "report")


def main() -> None:
    params = read_params()
    cfg = configure(parser().parse_args(), params)
    lm_dir, grf_dir = section(params, "datastore").get("model"), section(params, "grf").get("model")
    root = Path.cwd()
    in_dvc = (root / ".dvc").is_dir() and (root / "dvc.lock").is_file()  # else run by hand: read every file
    current = Provenance.from_workspace(root, {s.name for s in pipeline_stages(root)}) if in_dvc else None
    build_report(Path("reports"), cfg.n_examples, knnlm_base=Path(lm_dir).name if lm_dir else None,
                 grf_base=Path(grf_dir).name if grf_dir else None,
                 align_base=section(params, "align_sample").get("base"), provenance=current)


if __name__ == "__main__":
    cli.run(main)
