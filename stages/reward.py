"""Stage ``reward``: a Bradley–Terry reward model trained on the preference pairs.

Reports held-out pair accuracy and, on the synthetic language, the Pearson and Spearman
correlation of its scores with the oracle reward over every sample of ``align_sample``.

params: reward
deps:   data/align/{preferences,samples}.parquet, ${prepare.out_dir} (tokenizer); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (HF dir, safetensors), --live (dvclive curves)
metrics: --metrics
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.align.config import RewardConfig
from beyondlm.align.experiment import run_reward
from beyondlm.config import load_section, read_params, section
from beyondlm.inputs import load_tokenizer
from beyondlm.io import write_metrics


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--pairs", "--samples", "--tokenizer", "--out", "--live", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> RewardConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(RewardConfig, section(params, "reward"), "reward")


def main() -> None:
    args = parser().parse_args()
    cfg = configure(args, read_params())
    tokenizer = load_tokenizer(args.tokenizer)
    _, metrics = run_reward(cfg, args.pairs, args.samples, tokenizer, out_dir=args.out, live_dir=args.live)
    write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
