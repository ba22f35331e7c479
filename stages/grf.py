"""Stage ``grf@<seed>``: graph look-up (GRF) fine-tuned from an SFT model, compared with it on test.

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, grf.* (beyondlm/lookup/grf_experiment.py: GRFConfig)
deps:   ${grf.graph} (the graph stage's output), ${grf.model}, ${prepare.out_dir}; code: the import
        closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (model.safetensors: the fine-tuned LM + graph modules), --ckpt (resumable; persist),
        --live (dvclive curves)
metrics: --metrics (test: perplexity of the start LM, the fine-tuned LM alone and GRF on the same
         continuation tokens, forward KL per token; gate: mean, by word class; samples: impossible
         rates of both; convergence)
"""

import argparse
from pathlib import Path

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.graph import load_graph
from beyondlm.inputs import load_tokenizer
from beyondlm.io import atomic_path, write_metrics
from beyondlm.lookup.grf_experiment import GRFConfig, check_model, run_grf
from beyondlm.models import load_model


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, required=True)
    for arg in ("--out", "--ckpt", "--live", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> GRFConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(GRFConfig, section(params, "grf"), "grf")
    cfg.check_seed(args.seed)
    return cfg


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    tokenizer = load_tokenizer(prep.data_dir / "tokenizer")
    check_model(cfg.model, len(tokenizer))
    graph = load_graph(cfg.graph)
    splits = {name: list(load_split(prep.data_dir, name)["input_ids"]) for name in ("train", "valid")}
    test = load_split(prep.data_dir, "test")
    splits["test"] = list(test["input_ids"])
    splits["logp_data"] = list(test["logp_data"]) if "logp_data" in test.column_names else None
    prompts = [list(p) for p in load_split(prep.data_dir, "prompts_test")["prompt_ids"]]
    model, metrics = run_grf(cfg, args.seed, graph=graph, lm=load_model(cfg.model), start_lm=load_model(cfg.model),
                             splits=splits, prompts=prompts, prompt_len=prep.prompt_len, max_len=prep.max_len,
                             eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, language=prep.language(),
                             ckpt_dir=args.ckpt, live_dir=args.live)
    from safetensors.torch import save_model

    with atomic_path(args.out, is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
    write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    cli.run(main)
