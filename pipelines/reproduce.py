"""Prefect flow: run the DVC pipeline one task per stage, each mirrored into MLflow.

    python -m pipelines.reproduce                 # every stage (what `make repro` runs)
    python -m pipelines.reproduce sft evaluate    # these stages and everything upstream

Stages run one after another (DVC locks the workspace; parallel experiments go through
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

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from beyondlm.dvcgraph import StageInfo, pipeline_stages  # noqa: E402
from beyondlm.tracking import Tracker  # noqa: E402


def _stage_env() -> dict[str, str]:
    """DVC runs stage commands as `python -m stages.X`: make `python` this interpreter."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _history_dirs(info: StageInfo) -> list[Path]:
    return [p for p in info.plots if (p / "plots" / "metrics").is_dir()]


@task(name="dvc-stage", task_run_name="{info.name}", cache_policy=NO_CACHE)  # DVC caches, not Prefect
def run_stage(info: StageInfo, root: str, tracker: Tracker, force: bool = False) -> str:
    """``dvc repro --single-item <stage>``, then mirror the stage into a nested MLflow run."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", info.name, *(["--force"] if force else [])]
    logger.info("running %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=root, env=_stage_env())
    status = "FINISHED" if proc.returncode == 0 else "FAILED"
    tracker.log_stage(
        info.name,
        params=info.params,
        metrics_files=[p for p in info.metrics if p.exists()],
        history_dirs=_history_dirs(info),
        artifacts=[p for p in (*info.metrics, *info.plots, *info.outs) if p.exists() and p not in _history_dirs(info)],
        status=status,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"stage {info.name} failed (exit {proc.returncode}); see its output above")
    return info.name


@flow(name="reproduce", log_prints=True)
def reproduce(targets: list[str] | None = None, root: str = ".", force: bool = False,
              tracking_uri: str | None = None) -> list[str]:
    """Run the stages (all, or ``targets`` and their upstream) in dependency order."""
    root = str(Path(root).resolve())
    stages = pipeline_stages(root, targets)
    tracker = Tracker(tracking_uri, root=Path(root))
    tracker.start_pipeline("reproduce", params={"targets": targets or "all", "force": force})
    done: list[str] = []
    try:
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
    args = p.parse_args()
    reproduce(targets=args.targets or None, force=args.force)


if __name__ == "__main__":
    main()
