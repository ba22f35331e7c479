"""The Python half of ``benchmarks/gpu_check.sh``: environment and import checks, then an SFT
smoke through the real stages on whatever device accelerate picks (CUDA on the GPU machine).

    python -m benchmarks.gpu_check env   --out DIR                 # versions, CUDA; exit 3 if an import fails
    python -m benchmarks.gpu_check smoke --out DIR [--steps 200]   # stages.prepare + stages.sft → DIR/gpu_check.json

``smoke`` builds a throw-away project (params.yaml and dvc.yaml of this repo, smaller data and
step budgets) in a temp dir and runs ``python -m stages.prepare`` once and ``python -m stages.sft``
per (variant, precision), each in its own process (accelerate keeps one precision per process).
It also checks ``beyondlm.tracking.worker_device()`` with and without a visible GPU. (GRF's scoring and
sampling on the model's device: tests/test_grf.py, which gpu_check.sh runs on CUDA.)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What must import on the GPU machine before anything runs (the modules the tests and stages use).
IMPORTS = ("torch", "transformers", "accelerate", "datasets", "faiss", "dvclive", "mauve", "sklearn",
           "beyondlm.training", "beyondlm.sft", "beyondlm.objectives.sft", "beyondlm.objectives.preference",
           "beyondlm.align.train", "beyondlm.reward", "beyondlm.latent", "beyondlm.ebm", "beyondlm.lookup",
           "beyondlm.lookup.grf_experiment", "beyondlm.logprobs", "stages.prepare", "stages.sft")
VERSIONS = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface-hub", "datasets",
            "pyarrow", "fsspec", "pandas", "numpy", "faiss-cpu", "dvclive", "dvc", "mauve-text", "scikit-learn")
# sft.objectives entries the extra (shorter, bf16) runs train: every default objective besides mle.
EXTRA_VARIANTS = ("tailr-g1", "mixce-e0_1", "emo")


# ----------------------------------------------------------------------------- env
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Interpreter, package versions and what torch sees."""
    import torch

    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "executable": sys.executable,
            "versions": {d: _version(d) for d in VERSIONS},
            "torch_cuda": torch.version.cuda, "cuda_available": cuda,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    return info


def check_imports() -> dict[str, str]:
    """{module: error} for every module of IMPORTS that does not import (empty: all do)."""
    import importlib

    failed = {}
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - report every failure, not the first
            failed[name] = f"{type(err).__name__}: {err}"
    return failed


def cmd_env(args) -> int:
    failed = check_imports()
    info = {**environment(), "import_failures": failed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    if failed:
        print(f"FAIL: {len(failed)} module(s) do not import: {', '.join(failed)} (a missing wheel in .whl?)",
              file=sys.stderr)
        return 3
    if args.require_cuda and not info["cuda_available"]:
        print("FAIL: torch sees no CUDA device", file=sys.stderr)
        return 4
    return 0


# ----------------------------------------------------------------------------- smoke project
def _child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repo root on PYTHONPATH (stages run from a temp dir)."""
    env = dict(os.environ, **extra)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts + ([str(ROOT)] if str(ROOT) not in parts else []))
    return env


def write_params(work: Path, *, steps: int, precision: str, n_train: int) -> None:
    """The repo's params.yaml with a smaller corpus and a ``steps``-step sft budget at ``precision``.
    Per-variant ``train`` overrides lose their max_steps, so every variant runs ``steps`` steps."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(n_train=n_train, n_valid=max(256, n_train // 16), n_test=256, n_prompts=64)
    train = params["sft"]["train"]
    train.update(max_steps=steps, warmup_steps=min(train.get("warmup_steps", 0), steps // 4),
                 eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 2), log_every=max(1, min(10, steps // 5)),
                 mixed_precision=precision)
    for entry in params["sft"]["objectives"].values():
        (entry or {}).get("train", {}).pop("max_steps", None)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # quotes "no": stays a string


def run_stage(work: Path, module: str, *args: str, timeout: float) -> dict:
    """``python -m <module> args`` in ``work``: return code, wall seconds, output tail on failure."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=work, env=_child_env(),
                              capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    with open(work / "stages.log", "a") as log:
        log.write(f"\n===== {module} {' '.join(args)} (rc {rc})\n{out}")
    result = {"rc": rc, "process_wall_s": round(time.perf_counter() - t0, 2)}
    if rc != 0:
        result["output_tail"] = out[-3000:]
    return result


def _train_loss_curve(live: Path) -> list[float]:
    """dvclive's train/loss column, in step order ([] if the curve was not written)."""
    tsv = live / "plots" / "metrics" / "train" / "loss.tsv"
    if not tsv.exists():
        return []
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    col = rows[0].index("loss")
    return [float(r[col]) for r in rows[1:]]


def sft_run(work: Path, variant: str, precision: str, *, steps: int, n_train: int, timeout: float) -> dict:
    """One ``stages.sft`` run and what its metrics, timing and curves say."""
    write_params(work, steps=steps, precision=precision, n_train=n_train)
    name = f"{variant}-{precision}"
    metrics_path = work / "reports" / "metrics" / "sft" / f"{name}.json"
    res = run_stage(work, "stages.sft", "--variant", variant, "--seed", "0", "--out", f"models/sft/{name}",
                    "--ckpt", f"models/ckpt/sft/{name}", "--live", f"reports/live/sft/{name}",
                    "--metrics", str(metrics_path.relative_to(work)), timeout=timeout)
    res.update(variant=variant, mixed_precision_requested=precision)
    if res["rc"] != 0 or not metrics_path.exists():
        return res
    metrics = json.loads(metrics_path.read_text())
    timing_file = work / "reports" / "timing" / "sft" / f"{name}.json"
    timing = json.loads(timing_file.read_text()).get("train", {}) if timing_file.exists() else {}
    train, curve = metrics["train"], metrics["train"]["valid_curve"] or []
    losses = _train_loss_curve(work / "reports" / "live" / "sft" / name)
    wall = timing.get("wall_s")
    res.update(
        device=train["device"], mixed_precision=train["mixed_precision"], steps=train["steps"],
        loop_wall_s=wall, steps_per_s=round(train["steps"] / wall, 2) if wall else None,
        tokens_per_s=timing.get("tokens_per_s"),
        first_train_loss=losses[0] if losses else None, final_train_loss=train["final_loss"],
        heldout_curve=curve, heldout_nll_per_token=metrics["valid"]["nll_per_token"],
        heldout_perplexity=metrics["valid"]["perplexity"], converged=metrics["converged"],
        loss_went_down=bool(curve) and curve[-1][1] < curve[0][1]
        and (not losses or train["final_loss"] < losses[0]),
        finite=all(math.isfinite(v) for v in [train["final_loss"], metrics["valid"]["nll_per_token"]]),
        live_curves_written=bool(losses),
    )
    return res


# ----------------------------------------------------------------------------- device checks
def dispatch_device(cuda_visible: str) -> dict:
    """``beyondlm.tracking.worker_device()`` (a dispatched stage's ``worker/device`` tag) in a
    fresh process with ``CUDA_VISIBLE_DEVICES``."""
    proc = subprocess.run([sys.executable, "-c", "from beyondlm.tracking import worker_device; print(repr(worker_device()))"],
                          env=_child_env(CUDA_VISIBLE_DEVICES=cuda_visible), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return {"CUDA_VISIBLE_DEVICES": cuda_visible, "error": (proc.stdout + proc.stderr)[-1500:]}
    return {"CUDA_VISIBLE_DEVICES": cuda_visible, "device": ast.literal_eval(proc.stdout.strip().splitlines()[-1])}


def cmd_smoke(args) -> int:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="beyondlm_gpu_check_"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, work / name)
    deadline = time.monotonic() + args.budget_s
    report: dict = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                    "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
                    "steps": args.steps, "n_train": args.n_train, "work_dir": str(work)}
    write_params(work, steps=args.steps, precision="no", n_train=args.n_train)
    report["prepare"] = run_stage(work, "stages.prepare", timeout=300)
    runs = []
    if report["prepare"]["rc"] == 0:
        for precision in ("bf16", "no"):
            runs.append(sft_run(work, "mle", precision, steps=args.steps, n_train=args.n_train, timeout=300))
        for variant in EXTRA_VARIANTS if args.extra_steps else ():
            if time.monotonic() > deadline:
                runs.append({"variant": variant, "skipped": "smoke budget spent"})
                continue
            runs.append(sft_run(work, variant, "bf16", steps=args.extra_steps, n_train=args.n_train, timeout=180))
    report["sft"] = runs
    by = {(r["variant"], r.get("mixed_precision_requested")): r for r in runs}
    bf16, fp32 = by.get(("mle", "bf16"), {}), by.get(("mle", "no"), {})
    if bf16.get("steps_per_s") and fp32.get("steps_per_s"):
        report["mle_bf16_vs_fp32"] = {"speedup": round(bf16["steps_per_s"] / fp32["steps_per_s"], 3),
                                      "heldout_nll_diff": bf16["heldout_nll_per_token"] - fp32["heldout_nll_per_token"]}
    report["dispatch_device"] = [dispatch_device("0"), dispatch_device("")]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    ran = [r for r in runs if "skipped" not in r]
    report["ok"] = report["prepare"]["rc"] == 0 and bool(ran) and all(
        r["rc"] == 0 and r.get("device") == expected and r.get("mixed_precision") == r["mixed_precision_requested"]
        and r.get("loss_went_down") and r.get("finite") for r in ran)
    shutil.copy(work / "stages.log", args.out / "stages.log")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary(report: dict) -> str:
    """The report in a few lines (the whole of it is in gpu_check.json)."""
    lines = [f"device {report['device_name']!r}, torch {report['torch']}; prepare rc {report['prepare']['rc']}"]
    for r in report.get("sft", []):
        if "skipped" in r or r["rc"] != 0:
            lines.append(f"  sft {r['variant']}: {r.get('skipped') or 'rc %s: %s' % (r['rc'], r.get('output_tail', '')[-400:])}")
            continue
        lines.append(f"  sft {r['variant']:<11} {r['mixed_precision']:<4} on {r['device']}: {r['steps_per_s']} steps/s, "
                     f"train loss {_f(r['first_train_loss'])} -> {_f(r['final_train_loss'])}, held-out nll/token "
                     f"{r['heldout_nll_per_token']:.4f}, went down: {r['loss_went_down']}, curves: {r['live_curves_written']}")
    if "mle_bf16_vs_fp32" in report:
        lines.append(f"  mle bf16 vs fp32: {report['mle_bf16_vs_fp32']}")
    lines += [f"  worker_device() with CUDA_VISIBLE_DEVICES={d['CUDA_VISIBLE_DEVICES']!r}: "
              f"{d.get('device', d.get('error'))!r}" for d in report["dispatch_device"]]
    lines.append(f"SMOKE {'OK' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    env = sub.add_parser("env", help="versions, CUDA, import checks (exit 3 if one fails)")
    env.add_argument("--out", type=Path, required=True)
    env.add_argument("--require-cuda", action="store_true", help="exit 4 if torch sees no GPU")
    smoke = sub.add_parser("smoke", help="prepare + sft stages (bf16 and fp32) → OUT/gpu_check.json")
    smoke.add_argument("--out", type=Path, required=True)
    smoke.add_argument("--steps", type=int, default=200, help="sft steps of the mle runs (bf16 and no)")
    smoke.add_argument("--extra-steps", type=int, default=60, help="steps of each other objective (bf16); 0: none")
    smoke.add_argument("--n-train", type=int, default=8000, help="synthetic training texts")
    smoke.add_argument("--budget-s", type=float, default=100, help="seconds after which no extra variant starts")
    smoke.add_argument("--keep", action="store_true", help="keep the temp project")
    args = p.parse_args()
    sys.exit(cmd_env(args) if args.cmd == "env" else cmd_smoke(args))


if __name__ == "__main__":
    main()
