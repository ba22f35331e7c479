"""Dispatched reproduction (#12 items 1, 2, 4, 6) on Prefect's own engine, all on loopback: a real
``prefect server``, real ``prefect worker`` processes on the ``cpu`` and ``gpu`` process pools,
deployments made by ``python -m pipelines.dispatch setup`` whose pull step clones the project, a
local DVC remote and a real MLflow server. The project is the toy one of test_remote.py (stages
that take milliseconds) carrying this repository's ``beyondlm/`` and ``pipelines/``, so the workers
run the very code under test from their own clones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _free_port, _kill_group, _served
from tests.test_remote import GIT, STEP

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# train goes to the gpu pool (dvc.yaml meta); it sleeps while $SLOW_FLAG exists (the kill drill).
STEP_SLOW = STEP.replace('elif name == "train":\n',
                         'elif name == "train":\n'
                         '    Path(os.environ["RUN_LOG"] + ".pid").write_text(str(os.getpid()))\n'
                         '    import time\n'
                         '    while os.path.exists(os.environ["RUN_LOG"] + ".slow"):\n'
                         '        time.sleep(0.2)\n'
                         '    assert p["prepare"]["n"] > 0, "prepare.n must be positive"\n')
DVC_YAML = '''\
stages:
  prepare:
    cmd: python step.py prepare
    deps: [step.py]
    params: [prepare.n]
    outs: [data/prepared]
    metrics: [reports/metrics/prepare.json]
  train:
    meta: {pool: gpu}
    cmd: python step.py train
    deps: [step.py, data/prepared]
    params: [prepare.n]
    outs:
      - models/sft
      - models/ckpt: {persist: true}
    metrics: [reports/metrics/sft.json]
    plots: [{reports/live/sft: {persist: true}}]
  report:
    cmd: python step.py report
    deps: [step.py, reports/metrics/sft.json]
    outs: [reports/report.md]
'''


def _env(tmp: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["RUN_LOG"] = str(tmp / "runs.log")
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def sh(*args, cwd: Path, env: dict, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _project(path: Path, env: dict, remote: Path) -> Path:
    """The toy project with this repository's packages, committed, DVC remote = ``remote``."""
    path.mkdir(parents=True)
    for pkg in ("beyondlm", "pipelines"):
        shutil.copytree(ROOT / pkg, path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "step.py").write_text(STEP_SLOW)
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "params.yaml").write_text("prepare: {n: 3}\n")
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    sh("git", "init", "-q", "-b", "main", cwd=path, env=env)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=path, env=env)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote), cwd=path, env=env)
    sh("git", "add", "-A", cwd=path, env=env)
    sh(*GIT, "commit", "-q", "-m", "toy project", cwd=path, env=env)
    return path


def _lock_outs(root: Path) -> dict[str, str]:
    import yaml

    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {f"{name}:{o['path']}": o["md5"] for name, s in stages.items() for o in s.get("outs", [])}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, mlflow_server):
    """A Prefect server, the deployments, one cpu and two gpu workers; yields (env, project)."""
    tmp = tmp_path_factory.mktemp("dispatch")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp, api)
    server_dir = tmp / "server"
    server_dir.mkdir()
    project = _project(tmp / "project", env, tmp / "remote")
    cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]
    with _served(cmd, server_dir, f"{api}/health", "prefect server", 180, env=env):
        setup = sh(sys.executable, "-m", "pipelines.dispatch", "setup", "--repo", project, "--limit", "gpu=2",
                   cwd=project, env=env)
        assert "deployment dvc-stage/gpu" in setup.stdout
        workers = [_worker(pool, f"{pool}-{i}", tmp, env) for pool, i in (("cpu", 0), ("gpu", 0), ("gpu", 1))]
        try:
            yield env, project, tmp
        finally:
            for w in workers:
                _kill_group(w)


def _worker(pool: str, name: str, tmp: Path, env: dict) -> subprocess.Popen:
    log = open(tmp / f"worker-{name}.log", "wb")
    wenv = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
    return subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool,
                             "--name", name, "--limit", "1"], cwd=tmp, env=wenv, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _dispatch(project: Path, env: dict, *args: str, tracking: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, **({"MLFLOW_TRACKING_URI": tracking} if tracking else {})}
    return sh(sys.executable, "-m", "pipelines.dispatch", "run", *args, cwd=project, env=env, ok=False, timeout=600)


def _wait_online(env: dict, pools: dict[str, int], timeout_s: float = 120) -> None:
    code = ("import sys, json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps({p: sum(str(w.status.value) == 'ONLINE' for w in c.read_workers_for_work_pool(p))"
            f" for p in {list(pools)!r}}}))\n")
    deadline = time.monotonic() + timeout_s
    while True:
        got = json.loads(sh(sys.executable, "-c", code, cwd=ROOT, env=env).stdout.strip().splitlines()[-1])
        if all(got[p] >= n for p, n in pools.items()):
            return
        assert time.monotonic() < deadline, f"workers not online after {timeout_s} s: {got}"
        time.sleep(1)


def test_dispatched_run_matches_a_local_repro_and_logs_each_stage_from_its_worker(engine, mlflow_server, tmp_path):
    env, project, tmp = engine
    _wait_online(env, {"cpu": 1, "gpu": 2})
    proc = _dispatch(project, env, tracking=mlflow_server)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp / "runs.log").read_text().split() == ["prepare", "train", "report"]  # each once, on workers
    status = sh(sys.executable, "-m", "dvc", "status", "--json", cwd=project, env=env)
    assert status.stdout.strip() == "{}"  # dvc.lock merged, every output pulled: nothing to redo

    local = tmp_path / "local"
    sh("git", "clone", "-q", project, local, cwd=tmp_path, env=env)
    sh(sys.executable, "-m", "dvc", "repro", cwd=local, env={**env, "RUN_LOG": str(tmp_path / "local.log")})
    assert _lock_outs(project) == _lock_outs(local)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("beyondlm")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'", max_results=5)
    train = max(runs, key=lambda r: r.info.start_time)
    parent = client.get_run(train.data.tags["mlflow.parentRunId"])
    assert parent.data.params["dispatch"] == "True"
    assert train.data.tags["worker/device"] == "cpu" and train.data.tags["worker/host"]
    assert train.data.metrics["stage/wall_s"] > 0 and train.data.metrics["loss"] == pytest.approx(1 / 3)
