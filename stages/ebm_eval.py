"""Stage ``ebm_eval``: decoders on test prompts — plain sampling, top-k, top-p, EBM-SIR at each M.

Per decoder: each evaluation function's gap to the test reference mean, MAUVE against the
reference continuations (SFT-LM embeddings, offline), surface metrics; p_θ vs p* perplexity on
the test continuations with Ẑ(x) from ebm_eval.ppl_samples proposal samples per prompt, and the
cross-entropy difference H(p_d,p*) − H(p_d,p_θ) (``beyondlm.ebm.experiment``). The evaluation
functions and the embedder are the weights file's (what ``ebm`` fitted), not params.

params: prepare.out_dir, prepare.max_len, prepare.prompt_len, ebm_eval.*
deps:   stages/ebm_eval.py, beyondlm/ebm, beyondlm/ (sampling, logprobs, metrics, models, config,
        io, data/synthetic), models/sft/${ebm.base}, models/ebm/weights.json, ${prepare.out_dir}
metrics: --metrics
plots:  --plot-dir/quality_vs_m.tsv (M, mauve, gap_<f>), --plot-dir/quality_vs_m.png
"""

import argparse
import logging
import time
from pathlib import Path

from beyondlm import cli
from beyondlm.config import ConfigError, load_section, read_params, section
from beyondlm.data.prepare import load_split
from beyondlm.data.synthetic import SyntheticLanguage
from beyondlm.ebm import EBMSolution
from beyondlm.ebm.experiment import EBMEvalConfig, evaluate_decoders, quality_vs_m, reference_pairs
from beyondlm.io import atomic_path, read_json, write_json, write_text
from beyondlm.models import load_model

log = logging.getLogger("stages.ebm_eval")


def plot(rows: list[dict], tsv: Path, png: Path, *, chance_mauve: float) -> None:
    """TSV for ``dvc plots`` and a PNG: MAUVE and each |gap| against M (log axis).

    ``chance_mauve``: MAUVE of a second plain-sampling draw, drawn as a line: how far MAUVE moves
    between two draws of the same decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(rows[0])
    write_text(tsv, "\n".join(["\t".join(cols)] + ["\t".join(f"{r[c]:.6g}" for c in cols)
                                                   for r in rows]) + "\n")
    Ms = [r["M"] for r in rows]
    gaps = [c for c in cols if c.startswith("gap_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(Ms, [r["mauve"] for r in rows], "o-", label="sampling (M = 1), EBM-SIR")
    axes[0].axhline(chance_mauve, ls="--", c="gray", label="second plain-sampling draw")
    axes[0].legend(fontsize=8)
    axes[0].set(xscale="log", xlabel="M (SIR candidates; 1 = plain sampling)", ylabel="MAUVE")
    for c in gaps:  # relative to M = 1 so features of different units share an axis
        base = abs(rows[0][c]) or 1.0
        axes[1].plot(Ms, [abs(r[c]) / base for r in rows], "o-", label=c[4:])
    axes[1].set(xscale="log", xlabel="M", ylabel="|gap to reference| / |gap at M=1|")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.minorticks_off()  # log axis: label exactly the Ms
        ax.set_xticks(Ms, [str(m) for m in Ms])
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--model", "--weights", "--metrics", "--plot-dir"):
        p.add_argument(arg, type=Path, required=True)
    args = p.parse_args()
    params = read_params()
    cfg = load_section(EBMEvalConfig, section(params, "ebm_eval"), "ebm_eval")
    prep = section(params, "prepare")
    max_len, prompt_len = prep.get("max_len", 64), prep.get("prompt_len", 8)
    data_dir = Path(prep.get("out_dir", "data/prepared"))
    weights = read_json(args.weights)
    if weights.get("base") != args.model.name:
        raise ConfigError(f"{args.weights} was fitted for models/sft/{weights.get('base')}, "
                          f"not {args.model}: rerun the ebm stage")
    sol = EBMSolution.from_dict(weights)
    prompts, conts = reference_pairs(load_split(data_dir, "test")["input_ids"], prompt_len,
                                     cfg.n_prompts)
    lang_path = data_dir / "language.json"
    language = SyntheticLanguage.load(lang_path) if lang_path.exists() else None

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    result = evaluate_decoders(load_model(args.model), AutoTokenizer.from_pretrained(args.model),
                               prompts, conts, sol, cfg, max_new_tokens=max_len - prompt_len,
                               embedder=weights.get("embedder", "lm"), language=language)
    result["wall_s"] = time.perf_counter() - t0
    log.info("ppl base %.4f ebm %.4f ± %.4f; mauve %s (%.1f s)", result["ppl"]["base"],
             result["ppl"]["ebm"], result["ppl"]["ebm_se"],
             {k: round(v["mauve"], 3) for k, v in result["decoders"].items()}, result["wall_s"])
    write_json(args.metrics, result)
    plot(quality_vs_m(result, cfg.Ms), args.plot_dir / "quality_vs_m.tsv",
         args.plot_dir / "quality_vs_m.png",
         chance_mauve=result["decoders"]["sample_b"]["mauve"])


if __name__ == "__main__":
    cli.run(main)
