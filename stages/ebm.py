"""Stage ``ebm``: fit the energy-based decoder p* ∝ p_θ·exp(−μᵀf) of one SFT model.

Targets F̂ = mean evaluation functions of the valid split's reference continuations (prompt =
[BOS] + the first prepare.prompt_len tokens); μ from ebm.samples_per_prompt pure samples of p_θ
per reference prompt (``beyondlm.ebm.experiment.fit_ebm``).

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, ebm.*
deps:   models/sft/${ebm.base}, ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (JSON: μ, targets, residuals, ESS, features, embedder, base)
metrics: --metrics
"""

import argparse
import logging
import time
from pathlib import Path

from beyondlm import cli
from beyondlm.config import ConfigError, load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.ebm.experiment import EBMConfig, fit_ebm, reference_pairs
from beyondlm.inputs import load_tokenizer
from beyondlm.io import write_json, write_metrics
from beyondlm.models import load_model
from beyondlm.sampling import SamplingConfig

log = logging.getLogger("stages.ebm")


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--model", "--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> EBMConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(EBMConfig, section(params, "ebm"), "ebm")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    prep = prepared_data(params)
    max_len, prompt_len = prep.max_len, prep.prompt_len
    valid = load_split(prep.data_dir, "valid")
    prompts, conts = reference_pairs(valid["input_ids"], prompt_len, cfg.n_prompts)
    if len(prompts) < 2:
        raise ConfigError(f"only {len(prompts)} valid texts are longer than prepare.prompt_len="
                          f"{prompt_len}: lower it or raise prepare.n_valid")

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    sampling = SamplingConfig(max_new_tokens=max_len - prompt_len, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    try:
        sol, diag = fit_ebm(model, tokenizer, prompts, conts, cfg.features,
                            samples_per_prompt=cfg.samples_per_prompt, sampling_cfg=sampling,
                            seed=cfg.seed, embedder=cfg.embedder, tol=cfg.tol)
    except ValueError as err:  # an unmatchable target: the user drops a feature or samples more
        raise ConfigError(f"{err} (ebm.features={cfg.features}, "
                          f"ebm.samples_per_prompt={cfg.samples_per_prompt})") from err
    wall = time.perf_counter() - t0
    log.info("mu %s converged=%s ess_frac=%.3f (%.1f s)", dict(zip(sol.names, sol.mu.round(4))),
             sol.converged, sol.ess_frac, wall)
    weights = {**sol.to_dict(), "features": list(cfg.features), "embedder": cfg.embedder,
               "base": cfg.base}
    write_json(args.out, weights)
    write_metrics(args.metrics, {**sol.to_dict(), "base": cfg.base, "diagnostics": diag, "wall_s": wall})


if __name__ == "__main__":
    cli.run(main)
