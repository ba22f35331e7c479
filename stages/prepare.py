"""Stage ``prepare``: corpus, prompts and tokenizer as Parquet through ``datasets``.

params: prepare.*
deps:   inputs/prepare/ (local files named by prepare.local.*); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   ${prepare.out_dir}/ (splits, prompts, tokenizer, language.json for synthetic)
metrics: reports/metrics/prepare.json
"""

import argparse

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import PrepareConfig
from beyondlm.data.prepare import prepare, write_prepared
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.hub import check_hub_id
from beyondlm.io import write_metrics


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    return argparse.ArgumentParser(description=__doc__)


def configure(args: argparse.Namespace, params: dict) -> PrepareConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(PrepareConfig, section(params, "prepare"), "prepare")
    local = {f"prepare.local.{k}": getattr(cfg.local, k) for k in ("train", "valid", "test")} if cfg.source == "local" else {}
    check_declared_inputs("prepare", {**local, "prepare.tokenizer.name_or_path": cfg.tokenizer.name_or_path})
    if cfg.source == "hub":  # before any download: offline, the fix is a local source or a filled cache
        check_hub_id("prepare.hub.name", cfg.hub.name, "dataset",
                     "or set prepare.source: local with the files under inputs/prepare/")
    if cfg.tokenizer.kind in ("auto", "pretrained"):
        check_hub_id("prepare.tokenizer.name_or_path", cfg.tokenizer.name_or_path,
                     fix="or set prepare.tokenizer.kind: bpe")
    return cfg


def main() -> None:
    cfg = configure(parser().parse_args(), read_params())
    stats = write_prepared(prepare(cfg), cfg.out_dir)
    write_metrics("reports/metrics/prepare.json", {"source": cfg.source, **stats})


if __name__ == "__main__":
    cli.run(main)
