"""Is the default step budget enough? Learning curves of each SFT variant at a fraction and a
multiple of its params.yaml budget (README: "Sizing the default").

    python -m benchmarks.sizing                          # every default variant, budgets ×0.5, ×1, ×2
    python -m benchmarks.sizing --variants mle --scales 1 4

Each run trains exactly like stage ``sft@<variant>-<seed>`` (its params, per-variant overrides
included) on the prepared data (``dvc repro prepare`` first), with only ``max_steps`` scaled, and
records its held-out curve, convergence verdict, best held-out loss and wall time. The question
the table answers: does doubling the budget still buy a meaningful drop in held-out loss?
Writes ``reports/bench/sizing.json``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from beyondlm.config import read_params, section
from beyondlm.sft import sft_config
from beyondlm.data.config import prepared_data
from beyondlm.io import write_json
from beyondlm.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]


def sizing_run(sft: dict, variant: str, seed: int, scale: float, data_dir: Path) -> dict:
    cfg = sft_config(sft, variant, seed)
    steps = max(1, round(cfg.train.max_steps * scale))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps, ckpt_every=0))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = run_sft(cfg, data_dir, out_dir=Path(tmp) / "model", ckpt_dir=None, live_dir=None)
        wall = time.perf_counter() - start
    conv = metrics["convergence"]
    return {"variant": variant, "seed": seed, "scale": scale, "max_steps": steps, "lr": cfg.train.lr,
            "wall_s": wall, "converged": conv["converged"], "rel_improvement": conv["rel_improvement"],
            "best_step": conv["best_step"], "best_valid_loss": conv["best_valid_loss"],
            "valid_perplexity": metrics["valid"]["perplexity"], "valid_curve": metrics["train"]["valid_curve"]}


def table(rows: list[dict]) -> str:
    lines = ["| variant | steps (×budget) | best held-out loss | last-quarter share | converged | valid PPL | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['max_steps']} (×{r['scale']:g}) | {r['best_valid_loss']:.4f} | "
                     f"{100 * r['rel_improvement']:.1f}% | {'yes' if r['converged'] else 'no'} | "
                     f"{r['valid_perplexity']:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--variants", nargs="*", help="default: sft.variants")
    ap.add_argument("--scales", nargs="*", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench" / "sizing.json"))
    args = ap.parse_args(argv)
    params = read_params(args.params)
    sft = section(params, "sft")
    data_dir = ROOT / prepared_data(params).out_dir
    rows = []
    for variant in args.variants or sft["variants"]:
        for scale in args.scales:
            rows.append(sizing_run(sft, variant, args.seed, scale, data_dir))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    write_json(Path(args.out), {"seed": args.seed, "threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
