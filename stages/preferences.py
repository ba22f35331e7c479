"""Stage ``preferences``: preference pairs with the reference log-probs of both completions.

source=samples: every pair of a prompt's samples with distinct oracle rewards, chosen = higher r*.
source=file: prompt/chosen/rejected rows of a hub-style file (HH-RLHF dialogues are split at the
last assistant turn), tokenized and scored once by the SFT model. Pairs are split train/valid by
prompt (valid: the reward model's held-out accuracy).

params: prepare.out_dir, prepare.max_len, preferences
deps:   data/align/samples.parquet, models/sft/${align_sample.base}, inputs/preferences/, data/prepared
        (valid_split=prepared: its valid/test texts pick the held-out pairs); code: the import closure
        of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (parquet)
metrics: --metrics
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.align.config import PreferencesConfig
from beyondlm.align.experiment import run_preferences
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.inputs import load_tokenizer
from beyondlm.io import atomic_path, write_metrics


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--samples", "--model", "--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> PreferencesConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(PreferencesConfig, section(params, "preferences"), "preferences")
    if cfg.source == "file":
        check_declared_inputs("preferences", {"preferences.file.path": cfg.file.path})
    return cfg


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    sft = tokenizer = None
    if cfg.source == "file":
        from beyondlm.models import load_model

        tokenizer, sft = load_tokenizer(args.model), load_model(args.model).eval()
    heldout = set()
    if cfg.valid_split == "prepared":
        from beyondlm.data.prepare import load_split

        heldout = {t for name in ("valid", "test") for t in load_split(prep.data_dir, name)["text"]}
    with atomic_path(args.out) as tmp:
        metrics = run_preferences(cfg, args.samples, tmp, sft=sft, tokenizer=tokenizer, max_len=prep.max_len,
                                  heldout_texts=heldout)
    write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
