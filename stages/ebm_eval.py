"""Stage ``ebm_eval``: decoders on test prompts — plain sampling, top-k, top-p, EBM-SIR at each M.

Per decoder: each evaluation function's gap to the test reference mean, MAUVE against the
reference continuations (SFT-LM embeddings, offline), surface metrics; p_θ vs p* perplexity on
the test continuations with Ẑ(x) from ebm_eval.ppl_samples proposal samples per prompt, and the
cross-entropy difference H(p_d,p*) − H(p_d,p_θ) (``beyondlm.ebm.experiment``). The evaluation
functions and the embedder are the weights file's (what ``ebm`` fitted), not params.

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, ebm_eval.*
deps:   models/sft/${ebm.base}, models/ebm/weights.json, ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
metrics: --metrics
plots:  --plot-dir/quality_vs_m.tsv (M, mauve, gap_<f>), --plot-dir/quality_vs_m.png
"""

import argparse
import logging
import time
from pathlib import Path

from beyondlm import cli
from beyondlm.config import ConfigError, load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.ebm import EBMSolution
from beyondlm.ebm.experiment import EBMEvalConfig, evaluate_decoders, quality_vs_m, reference_pairs
from beyondlm.inputs import load_tokenizer, read_json
from beyondlm.io import write_metrics
from beyondlm.models import load_model
from beyondlm.report.ebm_plot import plot_quality_vs_m

log = logging.getLogger("stages.ebm_eval")


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--model", "--weights", "--metrics", "--plot-dir"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> EBMEvalConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(EBMEvalConfig, section(params, "ebm_eval"), "ebm_eval")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    max_len, prompt_len, data_dir = prep.max_len, prep.prompt_len, prep.data_dir
    weights = read_json(args.weights)
    if weights.get("base") != args.model.name:
        raise ConfigError(f"{args.weights} was fitted for models/sft/{weights.get('base')}, "
                          f"not {args.model}: rerun the ebm stage")
    sol = EBMSolution.from_dict(weights)
    prompts, conts = reference_pairs(load_split(data_dir, "test")["input_ids"], prompt_len,
                                     cfg.n_prompts)
    language = prep.language()

    t0 = time.perf_counter()
    result = evaluate_decoders(load_model(args.model), load_tokenizer(args.model),
                               prompts, conts, sol, cfg, max_new_tokens=max_len - prompt_len,
                               embedder=weights.get("embedder", "lm"), language=language)
    result["wall_s"] = time.perf_counter() - t0
    log.info("ppl base %.4f ebm %.4f ± %.4f; mauve %s (%.1f s)", result["ppl"]["base"],
             result["ppl"]["ebm"], result["ppl"]["ebm_se"],
             {k: round(v["mauve"], 3) for k, v in result["decoders"].items()}, result["wall_s"])
    write_metrics(args.metrics, result)
    plot_quality_vs_m(quality_vs_m(result, cfg.Ms), args.plot_dir / "quality_vs_m.tsv",
         args.plot_dir / "quality_vs_m.png",
         chance_mauve=result["decoders"]["sample_b"]["mauve"])


if __name__ == "__main__":
    cli.run(main)
