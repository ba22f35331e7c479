"""Stage ``evaluate@<run>``: perplexity, exact KL/TVD on the synthetic language, sample metrics,
sample vs data length distributions (``length``: histograms, TVD and its noise level).

params: prepare.out_dir, prepare.max_len, evaluate.*
deps:   the model dir, models/oracle (r* of the samples), ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --samples (jsonl of the model's samples: text, ids, log p_θ, log p_d)
metrics: --metrics
plots:  --plot (TSV: log p_d vs log p_θ per possible sample, for ``dvc plots``)
"""

import argparse
import json
from pathlib import Path

from beyondlm import cli
from beyondlm.config import EvaluateConfig, load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.evaluation import evaluate_lm
from beyondlm.inputs import load_tokenizer
from beyondlm.io import atomic_path, write_metrics, write_text
from beyondlm.models import load_model
from beyondlm.oracle import load_oracle


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--model", "--oracle", "--metrics", "--samples", "--plot"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> EvaluateConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(EvaluateConfig, section(params, "evaluate"), "evaluate")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    test = load_split(prep.data_dir, "test")
    language = prep.language()

    tokenizer = load_tokenizer(args.model)
    metrics, records = evaluate_lm(
        load_model(args.model), tokenizer, test["input_ids"], cfg, max_len=prep.max_len,
        language=language, test_logp_data=test["logp_data"] if language else None,
        oracle=load_oracle(args.oracle, prep),
    )
    write_metrics(args.metrics, metrics)
    with atomic_path(args.samples) as tmp:
        tmp.write_text("".join(json.dumps({"text": tokenizer.decode(r["ids"], skip_special_tokens=True), **r}) + "\n"
                               for r in records))
    rows = [f"{i}\t{r['logp_model']:.4f}\t{r['logp_data']:.4f}\t{len(r['ids'])}"
            for i, r in enumerate(records) if r.get("logp_data") is not None]
    write_text(args.plot, "\n".join(["sample\tlogp_model\tlogp_data\tlength", *rows]) + "\n")


if __name__ == "__main__":
    cli.run(main)
