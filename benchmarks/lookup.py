"""GRF's per-token decoding cost against the plain LM (issue #14 target: ≤ 1.5× at H = 2).

``python -m benchmarks.lookup --impl lm|grf``: one fresh process decodes ``--steps`` tokens for
``--batch`` test prompts with ``beyondlm.lookup.grf.generate`` (the same KV-cache loop: ``lm``
draws from the LM alone, ``grf`` from the mixture, subgraphs grounded and encoded per batch
inside the timing; ``ratio_without_grounding`` leaves the grounding out), EOS ignored so both do the same number of steps; prints one JSON line:
seconds per generated token, the load average before and after. ``lookup_bench`` runs the pair
interleaved ``repeats`` times (alternating who goes first) and reports medians and their ratio.

Inputs: the default pipeline's ``models/sft/mle-s0``, ``data/graph`` and ``data/prepared``
(the ``grf`` params section's paths); the GRF modules are freshly initialised (the cost does not
depend on their weights), with the section's γ, H, max_per_hop, edge caps and layers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import median

import torch

TARGET_RATIO = 1.5


def decode_cost(impl: str, steps: int, batch: int, threads: int, root: Path = Path(".")) -> dict:
    from beyondlm.config import load_section, read_params, section
    from beyondlm.data.config import prepared_data
    from beyondlm.data.prepare import load_split
    from beyondlm.graph import load_graph
    from beyondlm.lookup.grf import generate, graph_batch
    from beyondlm.lookup.grf_experiment import GRFConfig, build, grounder_for
    from beyondlm.models import load_model

    torch.set_num_threads(threads)
    params = read_params(root / "params.yaml")
    cfg, prep = load_section(GRFConfig, section(params, "grf"), "grf"), prepared_data(params)
    graph, lm = load_graph(root / cfg.graph), load_model(root / cfg.model)
    model = build(cfg, lm, graph, seed=0).eval()
    prompts = [list(p) for p in load_split(root / prep.data_dir, "prompts_test")["prompt_ids"]][:batch]
    grounder = grounder_for(cfg, graph, lm.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()

    def run(n_steps: int) -> tuple[float, float]:
        grounder._cached.cache_clear()  # every prompt grounded afresh, inside the timing
        t0 = time.perf_counter()
        gb = graph_batch([grounder(p[1:]) for p in prompts], graph.tokens) if impl == "grf" else None
        t1 = time.perf_counter()
        generate(model, torch.tensor(prompts), gb, max_new_tokens=n_steps, eos_id=-1, generator=gen)
        return time.perf_counter() - t0, t1 - t0

    run(2)  # warm-up (and the graph's encoding, computed once per model in eval mode)
    wall, ground = run(steps)
    n_tok = steps * len(prompts)
    return {"impl": impl, "seconds_per_token": wall / n_tok, "grounding_seconds_per_token": ground / n_tok,
            "decode_seconds_per_token": (wall - ground) / n_tok, "steps": steps, "batch": len(prompts),
            "threads": threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "hops": cfg.hops, "max_per_hop": cfg.max_per_hop, "max_in_edges": cfg.max_in_edges,
            "max_triples": cfg.max_triples}


def lookup_bench(repeats: int, threads: int, steps: int = 56, batch: int = 64) -> dict:
    """Median s/token of ``lm`` and ``grf`` over ``repeats`` interleaved fresh-process pairs."""
    from benchmarks.run import fresh

    runs: dict[str, list[dict]] = {"lm": [], "grf": []}
    for r in range(repeats):
        for impl in (("lm", "grf") if r % 2 == 0 else ("grf", "lm")):
            runs[impl].append(fresh("benchmarks.lookup", "--impl", impl, "--steps", str(steps), "--batch", str(batch),
                                    "--threads", str(threads)))
    med = {impl: median(x["seconds_per_token"] for x in rs) for impl, rs in runs.items()}
    decode = {impl: median(x["decode_seconds_per_token"] for x in rs) for impl, rs in runs.items()}
    loads = [x for rs in runs.values() for r in rs for x in (r["load_average_before"][0], r["load_average_after"][0])]
    ratio = med["grf"] / med["lm"]
    return {"seconds_per_token": med, "ratio_grf_over_lm": ratio,
            "decode_seconds_per_token": decode, "ratio_without_grounding": decode["grf"] / decode["lm"],
            "pair_ratios": [g["seconds_per_token"] / lm["seconds_per_token"] for g, lm in zip(runs["grf"], runs["lm"])],
            "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
            "load_average_1min": {"min": min(loads), "max": max(loads)}, "runs": runs,
            "settings": {"repeats": repeats, "threads": threads, "steps": steps, "batch": batch,
                         **{k: runs["grf"][0][k] for k in ("hops", "max_per_hop", "max_in_edges", "max_triples")}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--impl", choices=("lm", "grf"), required=True)
    p.add_argument("--steps", type=int, default=56)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    print(json.dumps(decode_cost(args.impl, args.steps, args.batch, args.threads)))


if __name__ == "__main__":
    main()
