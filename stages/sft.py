"""Stage ``sft@<variant>-<seed>``: train a causal LM with one objective of the table.

params: prepare.out_dir, sft.model, sft.objectives.<variant>, sft.<training keys>
deps:   ${prepare.out_dir}, inputs/sft/ (a local sft.model.name_or_path); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (HF dir, safetensors), --ckpt (resumable states; persist), --live (dvclive curves)
metrics: --metrics
"""

import argparse
import sys
from pathlib import Path

from beyondlm import cli, distributed
from beyondlm.config import read_params, section
from beyondlm.sft import SFTConfig, sft_config
from beyondlm.data.config import prepared_data
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.hub import check_hub_id
from beyondlm.io import write_metrics
from beyondlm.sft import run_sft


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", required=True)
    p.add_argument("--seed", type=int, required=True)
    for arg in ("--out", "--ckpt", "--live", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> SFTConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = sft_config(section(params, "sft"), args.variant, args.seed)
    check_declared_inputs("sft", {"sft.model.name_or_path": cfg.model.name_or_path})
    check_hub_id("sft.model.name_or_path", cfg.model.name_or_path, fix="or null to train the tiny GPT-2 of sft.model")
    return cfg


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    if (status := distributed.relaunch(cfg.train.processes, "sft.train.processes")) is not None:
        sys.exit(status)  # the workers ran this stage; rank 0 wrote its outs
    data_dir = prepared_data(params).data_dir
    metrics = run_sft(cfg, data_dir, out_dir=args.out, ckpt_dir=args.ckpt, live_dir=args.live)
    if distributed.is_main():
        write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
