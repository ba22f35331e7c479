"""Prefect flow: run the DVC pipeline one task per stage, each mirrored into MLflow.

    python -m pipelines.reproduce                 # every stage, one after another
    python -m pipelines.reproduce --workers 2     # independent stages two at a time (`make repro`)
    python -m pipelines.reproduce sft evaluate    # these stages and everything upstream

With ``--workers N`` (N > 1) every stage whose upstream stages are done is started, N at a time,
each with ``cpu_count // N`` torch threads. DVC locks the workspace for a whole ``dvc repro``, so
a concurrent stage is run the way ``dvc repro`` runs it, in three steps: ``dvc status <stage>``
(skip it when up to date), its command from dvc.yaml, then ``dvc commit <stage>`` (hashes, cache
and dvc.lock, as repro would record them); the DVC calls and the MLflow mirroring are serialized,
the commands overlap. The tiny default models run faster on one torch thread than on two here,
so two workers on two cores pay: the default took 17.7 min with two workers (README, "Sizing the
default"); a one-after-another run with somewhat smaller budgets, on a partly loaded machine, ~35 min.

Without ``--workers``, stages run one after another (parallel experiments go through
``dvc exp run --queue``, README "Sweeps"). Each task runs ``dvc repro --single-item
<stage>`` (a no-op when the stage is up to date), then logs a nested MLflow run with the stage's
declared params, metrics, training curves, git commit and dvc.lock hashes, under one parent run
per flow run. No Prefect server is needed: without PREFECT_API_URL the flow runs ephemerally.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# The ephemeral server's telemetry heartbeat races its own sqlite writes ("database is locked")
# and has nothing to report offline; MLflow's telemetry thread races env reads (see tracking.py).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import json  # noqa: E402
import threading  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import wait  # noqa: E402

from beyondlm.dvcgraph import StageInfo, pipeline_stages  # noqa: E402
from beyondlm.tracking import Tracker  # noqa: E402


def _stage_env() -> dict[str, str]:
    """DVC runs stage commands as `python -m stages.X`: make `python` this interpreter."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _history_dirs(info: StageInfo) -> list[Path]:
    return [p for p in info.plots if (p / "plots" / "metrics").is_dir()]


_DVC = threading.Lock()  # one DVC command (or MLflow mirroring) at a time in this workspace


def _dvc(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_stage_env(),
                          capture_output=True, text=True)


def _mirror(info: StageInfo, tracker: Tracker, ok: bool) -> None:
    tracker.log_stage(
        info.name,
        params=info.params,
        metrics_files=[p for p in info.metrics if p.exists()],
        history_dirs=_history_dirs(info),
        artifacts=[p for p in (*info.metrics, *info.plots, *info.outs) if p.exists() and p not in _history_dirs(info)],
        status="FINISHED" if ok else "FAILED",
    )


def _stale(info: StageInfo, root: str) -> bool:
    """Whether ``dvc status`` lists the stage (changed deps, params, outs or command)."""
    with _DVC:
        status = _dvc(root, "status", "--json", info.name)
    if status.returncode != 0:
        raise RuntimeError(f"dvc status {info.name} failed:\n{status.stderr[-2000:]}")
    return bool(json.loads(status.stdout.strip().splitlines()[-1] or "{}"))


@task(name="dvc-stage-concurrent", task_run_name="{info.name}", cache_policy=NO_CACHE)
def run_stage_concurrent(info: StageInfo, root: str, tracker: Tracker, force: bool, threads: int) -> str:
    """``dvc repro --single-item <stage>`` without holding DVC's workspace lock while the command
    runs: status (skip when up to date), the command, ``dvc commit``; then the MLflow mirror."""
    logger = get_run_logger()
    stale = force or _stale(info, root)
    ok = True
    if stale:
        logger.info("running %s (%d torch threads)", info.name, threads)
        env = {**_stage_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        ok = subprocess.run(info.cmd, shell=True, cwd=root, env=env).returncode == 0
        if ok:
            with _DVC:
                commit = _dvc(root, "commit", "--force", info.name)
            if commit.returncode != 0:
                raise RuntimeError(f"dvc commit {info.name} failed:\n{commit.stderr[-2000:]}")
    else:
        logger.info("%s is up to date", info.name)
    with _DVC:
        _mirror(info, tracker, ok)
    if not ok:
        raise RuntimeError(f"stage {info.name} failed; see its output above")
    return info.name


def _dependents(stages: list[StageInfo]) -> dict[str, int]:
    """How many stages depend on each one, directly or not: the ready stage with most goes first."""
    below: dict[str, set[str]] = {s.name: set() for s in stages}
    for s in reversed(stages):  # stages come upstream first, so walk downstream first
        for u in s.upstream:
            below[u] |= below[s.name] | {s.name}
    return {name: len(v) for name, v in below.items()}


def _run_concurrent(stages: list[StageInfo], root: str, tracker: Tracker, force: bool, workers: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    rank = _dependents(stages)
    pending = sorted(stages, key=lambda s: -rank[s.name])  # stable: ties keep pipeline order
    running: dict = {}
    done: list[str] = []
    failed: BaseException | None = None
    while running or (pending and failed is None):
        if failed is None:
            for info in [s for s in pending if all(u in done for u in s.upstream)][: workers - len(running)]:
                pending.remove(info)
                running[info.name] = run_stage_concurrent.submit(info, root, tracker, force, threads)
        if not running:
            raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages that never run")
        wait(list(running.values()), timeout=0.5)
        for name, future in list(running.items()):
            if future.state.is_final():
                del running[name]
                try:
                    done.append(future.result())
                except BaseException as err:  # let the running ones finish, start no more
                    failed = failed or err
    if failed is not None:
        raise failed
    return done


@task(name="dvc-stage", task_run_name="{info.name}", cache_policy=NO_CACHE)  # DVC caches, not Prefect
def run_stage(info: StageInfo, root: str, tracker: Tracker, force: bool = False) -> str:
    """``dvc repro --single-item <stage>``, then mirror the stage into a nested MLflow run."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", info.name, *(["--force"] if force else [])]
    logger.info("running %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=root, env=_stage_env())
    _mirror(info, tracker, proc.returncode == 0)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {info.name} failed (exit {proc.returncode}); see its output above")
    return info.name


@flow(name="reproduce", log_prints=True)
def reproduce(targets: list[str] | None = None, root: str = ".", force: bool = False,
              tracking_uri: str | None = None, workers: int = 1) -> list[str]:
    """Run the stages (all, or ``targets`` and their upstream) in dependency order, ``workers``
    at a time; the names of the stages run, in the order they finished."""
    root = str(Path(root).resolve())
    stages = pipeline_stages(root, targets)
    tracker = Tracker(tracking_uri, root=Path(root))
    tracker.start_pipeline("reproduce", params={"targets": targets or "all", "force": force, "workers": workers})
    done: list[str] = []
    try:
        if workers > 1:
            done = _run_concurrent(stages, root, tracker, force, workers)
        else:
            for info in stages:
                done.append(run_stage(info, root, tracker, force))
    except BaseException:
        tracker.end_pipeline("FAILED")
        raise
    tracker.end_pipeline("FINISHED")
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help="stages to run with their upstream (default: all)")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--workers", type=int, default=1, help="stages run at once (default 1: one after another)")
    args = p.parse_args()
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    reproduce(targets=args.targets or None, force=args.force, workers=args.workers)


if __name__ == "__main__":
    main()
