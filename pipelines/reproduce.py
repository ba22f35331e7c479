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
``dvc exp run --queue``, README "Sweeps"), each by ``dvc repro --single-item <stage>``.

One ``dvc status`` call up front finds the stale stages; only they and the stages downstream of
them are visited (a downstream stage is checked again once its upstream ran: an upstream stage
may rewrite the same outputs). When nothing is stale (and no ``--force``) the run logs one parent
MLflow run tagged ``outcome: nothing to do`` and returns; ``main`` checks before Prefect's
ephemeral server starts, so that costs seconds. Before any stage runs, the params of every stage
the run selects are loaded as the stages load them (``pipelines.validate``): a bad key anywhere
stops the run at once, naming each problem and the stages it would stop. Each stage that ran logs a nested MLflow run with
its declared params, metrics, timings (``stage/wall_s`` of its command, ``timing/...`` from its
untracked timing file), training curves, git commit, dvc.lock hashes and outputs (once per
content, see beyondlm.tracking), under one parent run per flow run. No Prefect server is needed:
without PREFECT_API_URL the flow runs ephemerally.
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
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import wait  # noqa: E402

from beyondlm.config import ConfigError, load_yaml  # noqa: E402
from beyondlm.dvcgraph import StageInfo, pipeline_stages  # noqa: E402
from beyondlm.tracking import Tracker  # noqa: E402
from pipelines.validate import validate_stages  # noqa: E402


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


def _mirror(info: StageInfo, tracker: Tracker, ok: bool, started: float, wall_s: float,
            tags: dict | None = None) -> None:
    tracker.log_stage(
        info.name,
        params=info.params,
        metrics_files=[p for p in info.metrics if p.exists()],
        history_dirs=_history_dirs(info),
        artifacts=[p for p in (*info.metrics, *info.plots, *info.outs) if p.exists() and p not in _history_dirs(info)],
        status="FINISHED" if ok else "FAILED",
        started=started,
        wall_s=wall_s,
        tags=tags,
    )


def _status(root: str, target: str | None = None) -> set[str]:
    """The stages ``dvc status`` lists (changed deps, params, outs or command), of all or ``target``.
    Ask for all: DVC collects each target on its own (16 stage names took ~7 s here, all ~2 s)."""
    with _DVC:
        status = _dvc(root, "status", "--json", *([target] if target else []))
    if status.returncode != 0:
        raise RuntimeError(f"dvc status {target or ''} failed:\n{status.stderr[-2000:]}")
    return set(json.loads(status.stdout.strip().splitlines()[-1] or "{}"))


def _must_run(info: StageInfo, root: str, stale: set[str]) -> bool:
    """Stale up front (or forced), or made stale since by an upstream stage that ran."""
    return info.name in stale or info.name in _status(root, info.name)


def _timed(cmd, **kwargs) -> tuple[int, float, float]:
    """(exit code, start as epoch seconds, wall seconds) of ``subprocess.run(cmd, **kwargs)``."""
    started, t0 = time.time(), time.perf_counter()
    code = subprocess.run(cmd, **kwargs).returncode
    return code, started, time.perf_counter() - t0


@task(name="dvc-stage-concurrent", task_run_name="{info.name}", cache_policy=NO_CACHE)
def run_stage_concurrent(info: StageInfo, root: str, tracker: Tracker, stale: set[str], threads: int) -> str | None:
    """``dvc repro --single-item <stage>`` without holding DVC's workspace lock while the command
    runs: status (skip when up to date), the command, ``dvc commit``; then the MLflow mirror.
    The stage's name if it ran, None if it was up to date."""
    logger = get_run_logger()
    if not _must_run(info, root, stale):
        logger.info("%s is up to date", info.name)
        return None
    logger.info("running %s (%d torch threads)", info.name, threads)
    env = {**_stage_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code, started, wall = _timed(info.cmd, shell=True, cwd=root, env=env)
    if code == 0:
        with _DVC:
            commit = _dvc(root, "commit", "--force", info.name)
        if commit.returncode != 0:
            raise RuntimeError(f"dvc commit {info.name} failed:\n{commit.stderr[-2000:]}")
    with _DVC:
        _mirror(info, tracker, code == 0, started, wall)
    if code != 0:
        raise RuntimeError(f"stage {info.name} failed; see its output above")
    return info.name


def _dependents(stages: list[StageInfo]) -> dict[str, int]:
    """How many stages depend on each one, directly or not: the ready stage with most goes first."""
    below: dict[str, set[str]] = {s.name: set() for s in stages}
    for s in reversed(stages):  # stages come upstream first, so walk downstream first
        for u in s.upstream:
            below[u] |= below[s.name] | {s.name}
    return {name: len(v) for name, v in below.items()}


def _downstream(stages: list[StageInfo], names: set[str]) -> list[StageInfo]:
    """The stages in ``names`` and those depending on one of them, directly or not, upstream
    first; their ``upstream`` keeps only stages among these (the others are up to date)."""
    hit = set(names)
    for s in stages:  # upstream first
        if s.name in hit or hit.intersection(s.upstream):
            hit.add(s.name)
    return [replace(s, upstream=tuple(u for u in s.upstream if u in hit)) for s in stages if s.name in hit]


def _run_concurrent(stages: list[StageInfo], root: str, tracker: Tracker, stale: set[str], workers: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    rank = _dependents(stages)
    pending = sorted(stages, key=lambda s: -rank[s.name])  # stable: ties keep pipeline order
    settled: set[str] = set()  # ran or found up to date
    running: dict = {}
    done: list[str] = []
    failed: BaseException | None = None
    while running or (pending and failed is None):
        if failed is None:
            for info in [s for s in pending if settled.issuperset(s.upstream)][: workers - len(running)]:
                pending.remove(info)
                running[info.name] = run_stage_concurrent.submit(info, root, tracker, stale, threads)
        if not running:
            raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages that never run")
        wait(list(running.values()), timeout=0.5)
        for name, future in list(running.items()):
            if future.state.is_final():
                del running[name]
                try:
                    done += [name] if future.result() else []
                    settled.add(name)
                except BaseException as err:  # let the running ones finish, start no more
                    failed = failed or err
    if failed is not None:
        raise failed
    return done


@task(name="dvc-stage", task_run_name="{info.name}", cache_policy=NO_CACHE)  # DVC caches, not Prefect
def run_stage(info: StageInfo, root: str, tracker: Tracker, stale: set[str], force: bool = False) -> str | None:
    """``dvc repro --single-item <stage>`` if the stage is stale, then mirror it into a nested MLflow
    run; the stage's name if it ran, None if it was up to date."""
    logger = get_run_logger()
    if not _must_run(info, root, stale):
        logger.info("%s is up to date", info.name)
        return None
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", info.name, *(["--force"] if force else [])]
    logger.info("running %s", " ".join(cmd[2:]))
    code, started, wall = _timed(cmd, cwd=root, env=_stage_env())
    _mirror(info, tracker, code == 0, started, wall)
    if code != 0:
        raise RuntimeError(f"stage {info.name} failed (exit {code}); see its output above")
    return info.name


def _run_params(targets: list[str] | None, force: bool, workers: int) -> dict:
    return {"targets": targets or "all", "force": force, "workers": workers}


def nothing_to_do(tracker: Tracker, params: dict) -> None:
    """The record of a run that found every stage up to date: one parent run, no stage runs."""
    tracker.start_pipeline("reproduce", params=params, tags={"outcome": "nothing to do"})
    tracker.end_pipeline("FINISHED")


def anything_stale(root: str, targets: list[str] | None = None) -> bool:
    """Whether ``dvc status`` finds a selected stage stale; the graph is read only for ``targets``."""
    stale = _status(root)
    return bool(stale) and (not targets or bool(stale & {s.name for s in pipeline_stages(root, targets)}))


def prune_lock(root: str, stages: list[StageInfo] | None = None) -> list[str]:
    """Drop the dvc.lock entries of stages dvc.yaml no longer defines (DVC keeps them, e.g. the
    matrix stages of a variant taken out of ``sft.variants``), so the lock describes the pipeline
    as it is; DVC's own YAML writer keeps every other line as DVC wrote it. ``stages``: every stage
    of the pipeline if the caller has them (not a targets subset). The names dropped."""
    from dvc.utils.serialize import modify_yaml

    lock = Path(root) / "dvc.lock"
    defined = {s.name for s in (stages if stages is not None else pipeline_stages(root))}
    if not lock.exists() or not set(load_yaml(lock).get("stages", {})) - defined:
        return []
    with _DVC, modify_yaml(str(lock)) as data:
        gone = [name for name in data["stages"] if name not in defined]
        for name in gone:
            del data["stages"][name]
    return gone


@flow(name="reproduce", log_prints=True)
def reproduce(targets: list[str] | None = None, root: str = ".", force: bool = False,
              tracking_uri: str | None = None, workers: int = 1) -> list[str]:
    """Run the stale stages (of all, or of ``targets`` and their upstream) and those downstream of
    them, in dependency order, ``workers`` at a time; the names of the stages that ran, in the
    order they finished ([]: nothing to do)."""
    root = str(Path(root).resolve())
    stages = pipeline_stages(root, targets)
    names = {s.name for s in stages}
    stale = names if force else names & _status(root)
    tracker = Tracker(tracking_uri, root=Path(root))
    if not stale:
        get_run_logger().info("every stage is up to date: nothing to do")
        nothing_to_do(tracker, _run_params(targets, force, workers))
        return []
    todo = _downstream(stages, stale)
    validate_stages(todo, root)  # every params problem of the run, before any stage starts
    tracker.start_pipeline("reproduce", params=_run_params(targets, force, workers),
                           tags={"stale": ", ".join(sorted(stale))})
    done: list[str] = []
    try:
        if workers > 1:
            done = _run_concurrent(todo, root, tracker, stale, workers)
        else:
            for info in todo:
                done += [name] if (name := run_stage(info, root, tracker, stale, force)) else []
    except BaseException:
        tracker.end_pipeline("FAILED")
        raise
    if gone := prune_lock(root, None if targets else stages):  # all stages are at hand without targets
        get_run_logger().info("dropped dvc.lock entries of stages no longer in dvc.yaml: %s", ", ".join(gone))
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
    targets = args.targets or None
    if not args.force and not anything_stale(".", targets):  # checked before Prefect's server starts
        print("every stage is up to date: nothing to do")
        nothing_to_do(Tracker(root=Path.cwd()), _run_params(targets, args.force, args.workers))
        return
    try:  # the same check the flow makes, here as one clear message before Prefect starts
        validate_stages(pipeline_stages(".", targets), ".")
    except ConfigError as err:  # exit 2, as the stages do on a params error
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    reproduce(targets=targets, force=args.force, workers=args.workers)


if __name__ == "__main__":
    main()
