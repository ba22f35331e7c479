"""Stage ``bigram@<variant>-<seed>``: MixCE's synthetic experiment (random bigram gold LM).

Trains a tiny GPT-2 on samples of the gold bigram LM with the objective of ``sft.objectives.<variant>``
and compares its transition rows to the gold rows exactly (beyondlm/bigram_experiment.py).

params: bigram (language, model, train, n_train, n_test), sft.objectives.<variant>
deps:   none but code (the gold data are generated from bigram.language); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   none (the gold data are regenerated from the seed; the model is not kept)
Runs single-threaded (see main).
metrics: --metrics
"""

import argparse
from pathlib import Path

import torch

from beyondlm import cli
from beyondlm.bigram_experiment import bigram_config, run_bigram
from beyondlm.config import read_params, section
from beyondlm.sft import variant_objective
from beyondlm.io import write_metrics


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict):
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return bigram_config(section(params, "bigram")), variant_objective(section(params, "sft"), args.variant)


def main() -> None:
    args = parser().parse_args()
    # A ~60k-parameter model gains nothing from intra-op threads; on shared cores the idle threads'
    # spinning made runs 2-5x slower in wall time (measured on the 2-core reference machine).
    torch.set_num_threads(1)
    cfg, (objective, hyperparams) = configure(args, read_params())
    write_metrics(args.metrics, run_bigram(cfg, args.variant, objective, hyperparams, args.seed))


if __name__ == "__main__":
    cli.run(main)
