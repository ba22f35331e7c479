"""Stage ``best_of_n``: the decoding baseline — N samples from π_sft, keep the reward model's best.

Same held-out prompts, reference set and metrics as ``align``; KL is the analytic log N − (N−1)/N.

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, align_sample.base, align.eval, best_of_n
deps:   models/sft/${align_sample.base}, models/oracle (r*), models/reward, data/align/preferences.parquet (align.eval.prompts=pairs), ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
metrics: --metrics; plots: --plot (tsv: N, kl, oracle_reward, rm_reward)
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.align.config import AlignConfig, BestOfNConfig
from beyondlm.align.experiment import evaluation_prompts, run_best_of_n
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.inputs import load_tokenizer
from beyondlm.io import write_metrics, write_tsv
from beyondlm.models import load_model
from beyondlm.oracle import load_oracle


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--sft", "--reward", "--oracle", "--pairs", "--metrics", "--plot"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> tuple[BestOfNConfig, AlignConfig]:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return (load_section(BestOfNConfig, section(params, "best_of_n"), "best_of_n"),
            load_section(AlignConfig, section(params, "align"), "align"))


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg, align = configure(args, params)
    prep = prepared_data(params)
    tokenizer = load_tokenizer(args.sft)
    prompts, max_new = evaluation_prompts(align.eval, load_split(prep.data_dir, "prompts_test")["prompt_ids"],
                                          args.pairs, max_len=prep.max_len, prompt_len=prep.prompt_len)
    result = run_best_of_n(cfg, load_model(args.sft).eval(), load_model(args.reward, kind="reward"), tokenizer,
                           load_oracle(args.oracle, prep), prompts, eval_cfg=align.eval, max_new_tokens=max_new)
    write_tsv(args.plot, [{k: r.get(k) for k in ("N", "kl", "oracle_reward", "rm_reward")} for r in result["rows"]])
    write_metrics(args.metrics, result)


if __name__ == "__main__":
    cli.run(main)
