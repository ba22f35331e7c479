"""`make bench`: performance figures, each against its peer measured in the same run.

Writes ``reports/bench/objectives.json`` (per-step cost of each SFT objective relative to MLE,
``benchmarks/objectives.py``), ``reports/bench/sir.json`` (EBM-SIR decoding vs plain sampling of
the same candidates, ``benchmarks/sir.py``), ``reports/bench/knnlm.json`` (kNN-LM datastore build
rate, exact vs IVF-PQ query throughput, recall, bytes per key and perplexity,
``benchmarks/knnlm.py``), ``reports/bench/align.json`` (per-step time of our DPO vs TRL's
``DPOTrainer``, and of EXO-rw vs DPO-rw, ``benchmarks/align.py``), ``reports/bench/lookup.json``
(GRF's per-token decoding cost vs the plain LM, interleaved fresh processes, ``benchmarks/lookup.py``),
``reports/bench/scaleout.json`` (the default pipeline from scratch, one stage after another vs two
workers in one workspace (`make repro`) and dispatched to Prefect workers, and no-op runs, ``benchmarks/scaleout.py``; ~1.5 h here)
and ``reports/bench/sft.json``:
- SFT training throughput of our loop vs a plain ``transformers.Trainer`` on the same tiny model,
  data, batch and schedule (median of ``--repeats`` interleaved runs, each in a fresh process with
  the same torch threads), their ratio, each pair's ratio, the real-token fraction of each side,
  the load average around every run, and each one's peak RSS;
- wall time of the default ``dvc repro`` from scratch in a temp copy of the repo, and of a
  second, no-op ``dvc repro`` (that run's metrics and report are kept in
  ``reports/bench/default_run/``).

``--only knnlm sir`` runs just those benches (default: all of ``BENCHES``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from beyondlm.io import write_json

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("sft", "objectives", "sir", "knnlm", "align", "lookup", "scaleout")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def fresh(module: str, *args: str) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line, parsed as JSON."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def throughput(impl: str, steps: int, threads: int) -> dict:
    return fresh("benchmarks.sft_throughput", "--impl", impl, "--steps", str(steps), "--threads", str(threads))


def sft_comparison(steps: int, repeats: int, threads: int) -> dict:
    """Median tokens/s of our loop and Trainer over ``repeats`` interleaved pairs, each run in a fresh
    process with the same torch threads; the ratio of medians and each pair's own ratio."""
    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    for r in range(repeats):  # interleaved (and alternating who goes first), so drifting load hits both alike
        for impl in (("ours", "trainer") if r % 2 == 0 else ("trainer", "ours")):
            runs[impl].append(throughput(impl, steps, threads))
    summary = {impl: {"tokens_per_s": median(r["tokens_per_s"] for r in rs),
                      "real_token_fraction": median(r["real_token_fraction"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": rs} for impl, rs in runs.items()}
    summary["ratio_ours_over_trainer"] = summary["ours"]["tokens_per_s"] / summary["trainer"]["tokens_per_s"]
    summary["pair_ratios"] = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(runs["ours"], runs["trainer"])]
    summary["load_average_1min"] = {"min": min(x for rs in runs.values() for r in rs
                                               for x in (r["load_average_before"][0], r["load_average_after"][0])),
                                    "max": max(x for rs in runs.values() for r in rs
                                               for x in (r["load_average_before"][0], r["load_average_after"][0]))}
    summary["settings"] = {"steps": steps, "repeats": repeats, "threads": threads, "target_ratio": 1.5,
                           "compile": "not used: 0.99-1.03x per step on this CPU model, plus compile time"}
    return summary


def repro_timing() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "project"
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
        for rel in files:
            if (ROOT / rel).is_file() and not rel.startswith(("data/", "models/", "reports/")):
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, work / rel)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        subprocess.run(["git", "add", "-A"], cwd=work, check=True)
        subprocess.run([*git, "commit", "-qm", "bench"], cwd=work, check=True)
        timings = {}
        for name in ("dvc_repro_s", "dvc_repro_noop_s"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=_env(), check=True,
                           stdout=subprocess.DEVNULL)
            timings[name] = time.perf_counter() - t0
        # keep what the timed run produced, so the timing can be audited against its results
        kept = ROOT / "reports" / "bench" / "default_run"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(work / "reports", kept, ignore=shutil.ignore_patterns("live", "samples"))
    return timings


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}  # 1/5/15-min: other jobs sharing the cores


def sft_bench(args, machine: dict) -> dict:
    result = {"machine": machine, "sft": sft_comparison(args.steps, args.repeats, args.threads)}
    out = ROOT / "reports" / "bench" / "sft.json"
    if not args.skip_repro:
        result["pipeline"] = repro_timing()
    elif out.exists() and "pipeline" in (old := json.loads(out.read_text())):
        result["pipeline"] = {**old["pipeline"], "carried_over": "from an earlier run (--skip-repro)"}
    write_json(out, result)
    sft = result["sft"]
    return {"ours_tokens_per_s": sft["ours"]["tokens_per_s"], "trainer_tokens_per_s": sft["trainer"]["tokens_per_s"],
            **{k: v for k, v in sft.items() if k not in ("ours", "trainer")}} | result.get("pipeline", {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed SFT steps per run (after 5 untimed)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of every run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-repro", action="store_true", help="skip the (minutes-long) dvc repro timing")
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), metavar="BENCH",
                   help=f"run only these benches, of: {', '.join(BENCHES)}")
    args = p.parse_args()
    machine, summary = machine_info(), None
    if "sft" in args.only:
        summary = sft_bench(args, machine)
    from beyondlm.config import ModelConfig, load_section, read_params, section

    model_cfg = load_section(ModelConfig, section(read_params(ROOT / "params.yaml"), "sft").get("model"), "sft.model")
    if "objectives" in args.only:
        from benchmarks.objectives import objective_overheads

        overheads = objective_overheads(model_cfg)
        write_json(ROOT / "reports" / "bench" / "objectives.json", {"machine": machine, "objectives": overheads})
        print(json.dumps(overheads, indent=1))
    if "sir" in args.only:
        from benchmarks.sir import sir_overhead

        sir = sir_overhead(args.repeats)
        write_json(ROOT / "reports" / "bench" / "sir.json", {"machine": machine, **sir})
        print(json.dumps(sir, indent=1))
    if "knnlm" in args.only:
        from benchmarks.knnlm import knnlm_bench

        knnlm = knnlm_bench(ROOT)
        write_json(ROOT / "reports" / "bench" / "knnlm.json", {"machine": machine, **knnlm})
        print(json.dumps({"datastore_keys_per_min": knnlm["datastore"]["keys_per_min"], **knnlm["targets"]},
                         default=str, indent=1))
    if "align" in args.only:
        from benchmarks.align import align_bench, machine_extras

        align = align_bench()
        write_json(ROOT / "reports" / "bench" / "align.json", {"machine": {**machine, **machine_extras()}, **align})
        print(json.dumps({k: {m: v[m] for m in v if "ratio" in m or m == "met"} for k, v in align.items()
                          if isinstance(v, dict) and "met" in v}, indent=1))
    if "lookup" in args.only:
        from benchmarks.lookup import lookup_bench

        lookup = lookup_bench(args.repeats, args.threads)
        write_json(ROOT / "reports" / "bench" / "lookup.json", {"machine": machine, **lookup})
        print(json.dumps({k: v for k, v in lookup.items() if k != "runs"}, indent=1))
    if "scaleout" in args.only:
        from benchmarks.scaleout import scaleout_bench

        scaleout = scaleout_bench(out=ROOT / "reports" / "bench" / "scaleout.json")  # after each side
        write_json(ROOT / "reports" / "bench" / "scaleout.json", {"machine": machine, **scaleout})
        print(json.dumps({k: v for k, v in scaleout.items() if not isinstance(v, dict)}, indent=1))
    if summary is not None:
        print(json.dumps(summary, default=str, indent=1))


if __name__ == "__main__":
    main()
