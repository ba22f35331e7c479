"""Stage ``align@<method>``: one policy per seed from the SFT model, evaluated along the way.

Methods: the rows of the preference-loss table (``beyondlm/objectives/preference.py``): dpo_pref,
exo_pref, ipo, simpo (preference pairs), kto (the pairs unpaired into desirable/undesirable
completions), dpo_rw, exo_rw, bond (K samples per prompt scored by the reward model), rloo, grpo,
dr_grpo (on-policy, reward model + KL to π_sft). Each seed trains with resumable
checkpoints; at step 0 and every ``align.eval_every`` steps the policy is evaluated on held-out
prompts (``align.eval.prompts``: prepare's prompts_test, or the held-out pairs' prompts): oracle and reward-model reward, KL(π_θ‖π_sft), win rates (``beyondlm.align.evaluate``).

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, align_sample.base, align
deps:   models/sft/${align_sample.base}, models/oracle (r*), models/reward, data/align/*.parquet, ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (s<seed>/ HF dirs), --ckpt (persist)
metrics: --metrics; plots: --plot (tsv: seed, step, kl, oracle_reward, rm_reward)
"""

import argparse
import sys
from pathlib import Path

from beyondlm import cli, distributed
from beyondlm.align.config import AlignConfig
from beyondlm.align.experiment import evaluation_prompts, frontier_rows, run_align
from beyondlm.config import ConfigError, load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.inputs import load_tokenizer
from beyondlm.io import write_metrics, write_tsv
from beyondlm.models import load_model
from beyondlm.oracle import load_oracle


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", required=True)
    for arg in ("--sft", "--reward", "--oracle", "--samples", "--pairs", "--out", "--ckpt", "--metrics", "--plot"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> AlignConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(AlignConfig, section(params, "align"), "align")
    if args.method not in cfg.methods:
        raise ConfigError(f"--method {args.method} is not in align.methods={cfg.methods}")
    return cfg


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    processes = cfg.train_config(args.method, cfg.seeds[0]).processes
    if (status := distributed.relaunch(processes, f"align.hyperparams.{args.method}.train.processes")) is not None:
        sys.exit(status)  # the workers ran this stage; rank 0 wrote its outs
    prep = prepared_data(params)
    tokenizer = load_tokenizer(args.sft)
    prompts, max_new = evaluation_prompts(cfg.eval, load_split(prep.data_dir, "prompts_test")["prompt_ids"], args.pairs,
                                          max_len=prep.max_len, prompt_len=prep.prompt_len)
    result = run_align(args.method, cfg, sft_dir=args.sft, reward_model=load_model(args.reward, kind="reward"),
                       tokenizer=tokenizer, oracle=load_oracle(args.oracle, prep), samples=args.samples, pairs=args.pairs,
                       test_prompts=prompts, max_new_tokens=max_new, out_dir=args.out, ckpt_dir=args.ckpt)
    if result is not None:  # rank 0 (or one process)
        write_tsv(args.plot, frontier_rows(result))
        write_metrics(args.metrics, result)


if __name__ == "__main__":
    cli.run(main)
