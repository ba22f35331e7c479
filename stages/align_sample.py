"""Stage ``align_sample``: K completions per training prompt from the SFT model, with log π_sft.

The reference log-probs are read off the sampling pass (raw logits) and stored: no alignment
stage recomputes them. Each completion also gets its oracle reward r* (``models/oracle``, the
``oracle`` stage: the synthetic language's exact posterior or a sentiment classifier), where one exists.

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, align_sample
deps:   models/sft/${align_sample.base}, models/oracle (r*), ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (parquet: prompt_ids, completions, ref_logps, oracle)
metrics: --metrics
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.align.config import SampleConfig
from beyondlm.align.experiment import run_sample
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.inputs import load_tokenizer
from beyondlm.io import atomic_path, write_metrics
from beyondlm.models import load_model
from beyondlm.oracle import load_oracle


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--model", "--oracle", "--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> SampleConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(SampleConfig, section(params, "align_sample"), "align_sample")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    prompts = load_split(prep.data_dir, "prompts_train")["prompt_ids"]
    with atomic_path(args.out) as tmp:
        metrics = run_sample(cfg, model, tokenizer, prompts, max_new_tokens=prep.max_len - prep.prompt_len,
                             oracle=load_oracle(args.oracle, prep), out=tmp)
    write_metrics(args.metrics, {**metrics, "base": cfg.base})


if __name__ == "__main__":
    cli.run(main)
