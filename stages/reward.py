"""Stage ``reward``: a Bradley–Terry reward model trained on the preference pairs.

Reports held-out pair accuracy and, on the synthetic language, the Pearson and Spearman
correlation of its scores with the oracle reward over every sample of ``align_sample``.

params: reward
deps:   data/align/{preferences,samples}.parquet, ${prepare.out_dir} (tokenizer), inputs/reward/ (a local
        reward.model.name_or_path); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (HF dir, safetensors), --live (dvclive curves)
metrics: --metrics
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.align.config import RewardConfig
from beyondlm.align.experiment import run_reward
from beyondlm.config import load_section, read_params, section
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.hub import check_hub_id
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
    cfg = load_section(RewardConfig, section(params, "reward"), "reward")
    check_declared_inputs("reward", {"reward.model.name_or_path": cfg.model.name_or_path})
    check_hub_id("reward.model.name_or_path", cfg.model.name_or_path, fix="or null to train the tiny GPT-2 of reward.model")
    return cfg


def main() -> None:
    args = parser().parse_args()
    cfg = configure(args, read_params())
    tokenizer = load_tokenizer(args.tokenizer)
    _, metrics = run_reward(cfg, args.pairs, args.samples, tokenizer, out_dir=args.out, live_dir=args.live)
    write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
