"""Stage ``prepare``: corpus, prompts and tokenizer as Parquet through ``datasets``.

params: prepare.*
deps:   stages/prepare.py, beyondlm/data/, beyondlm/config.py, beyondlm/io.py
outs:   ${prepare.out_dir}/ (splits, prompts, tokenizer, language.json for synthetic)
metrics: reports/metrics/prepare.json
"""

from beyondlm import cli
from beyondlm.config import PrepareConfig, load_section, read_params, section
from beyondlm.data.prepare import prepare, write_prepared
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.io import write_metrics


def main() -> None:
    cfg = load_section(PrepareConfig, section(read_params(), "prepare"), "prepare")
    local = {f"prepare.local.{k}": getattr(cfg.local, k) for k in ("train", "valid", "test")} if cfg.source == "local" else {}
    check_declared_inputs("prepare", {**local, "prepare.tokenizer.name_or_path": cfg.tokenizer.name_or_path})
    stats = write_prepared(prepare(cfg), cfg.out_dir)
    write_metrics("reports/metrics/prepare.json", {"source": cfg.source, **stats})


if __name__ == "__main__":
    cli.run(main)
