"""Stage ``vq``: the latent-plan LM (discrete codes as a plan, EMNLP'21) against an SFT baseline.

Trains the posterior encoder + discretizer + decoder, then the AR prior over codes
(``beyondlm.latent.experiment.run_vq``); reports codebook usage, reconstruction NLL, the NLL bound,
prior → decoder sample metrics (exact log p_d on the synthetic language) and the same for the
baseline SFT model ``vq.baseline``.

params: prepare.out_dir, prepare.max_len, vq.*
deps:   ${vq.baseline}, ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (dir: plan_model.safetensors, prior/, tokenizer/, config.json)
metrics: --metrics
plots:  --live (optional: dvclive curves of both loops, posterior/ and prior/)
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.io import write_metrics
from beyondlm.latent.experiment import VQConfig, run_vq


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    p.add_argument("--live", type=Path, default=None)
    return p


def configure(args: argparse.Namespace, params: dict) -> VQConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(VQConfig, section(params, "vq"), "vq")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    metrics = run_vq(cfg, prep.data_dir, max_len=prep.max_len, out_dir=args.out,
                     live_dir=args.live, language=prep.language())
    write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
