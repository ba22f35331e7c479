"""Stage ``report``: ``reports/report.md`` with tables and PNG figures from every stage's outputs.

params: report.*
deps:   stages/report.py, beyondlm/report.py, reports/metrics, reports/live, reports/samples
outs:   reports/report.md, reports/plots/report/
"""

from pathlib import Path

from beyondlm import cli
from beyondlm.config import ReportConfig, load_section, read_params, section
from beyondlm.report import build_report


def main() -> None:
    cfg = load_section(ReportConfig, section(read_params(), "report"), "report")
    build_report(Path("reports"), cfg.n_examples)


if __name__ == "__main__":
    cli.run(main)
