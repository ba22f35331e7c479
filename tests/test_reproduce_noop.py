"""pipelines.reproduce on a toy three-stage DVC project (seconds a stage, not minutes): an
up-to-date workspace is a cheap no-op with one MLflow parent run; a partly stale one logs only the
stages that ran, each with its own wall time and timing file, outputs once per content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.reproduce import reproduce  # before Prefect's harness: sets its analytics off

pytestmark = pytest.mark.slow  # real DVC, Prefect and MLflow; ~1 min

# a: params a.n -> data/a.txt (n // 10: n = 1 and n = 2 write the same bytes) + metrics + timing
# b: data/a.txt, params b.k -> metrics;  c: params c.m -> data/c.txt (independent of a and b)
STEP = '''\
import json, sys
from pathlib import Path
import yaml
name, p = sys.argv[1], yaml.safe_load(open("params.yaml"))
def put(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
if name == "a":
    put("data/a.txt", str(p["a"]["n"] // 10))
    put("reports/metrics/a.json", json.dumps({"n": p["a"]["n"]}))
    put("reports/timing/a.json", json.dumps({"wall_s": 0.25}))
elif name == "b":
    put("reports/metrics/b.json", json.dumps({"k": p["b"]["k"], "a": Path("data/a.txt").read_text()}))
else:
    put("data/c.txt", str(p["c"]["m"]))
'''
DVC_YAML = '''\
stages:
  a:
    cmd: python step.py a
    deps: [step.py]
    params: [a.n]
    outs: [data/a.txt]
    metrics: [{reports/metrics/a.json: {cache: false}}]
  b:
    cmd: python step.py b
    deps: [step.py, data/a.txt]
    params: [b.k]
    metrics: [{reports/metrics/b.json: {cache: false}}]
  c:
    cmd: python step.py c
    deps: [step.py]
    params: [c.m]
    outs: [data/c.txt]
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACT_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stage cmds: `python`
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # `python -m pipelines.reproduce`
    return env


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def set_params(root: Path, n: int = 1, k: int = 1, m: int = 1) -> None:
    (root / "params.yaml").write_text(f"a: {{n: {n}}}\nb: {{k: {k}}}\nc: {{m: {m}}}\n")


class Runs:
    """The MLflow runs of the project's default sqlite store, by id."""

    def __init__(self, root: Path):
        self.client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        self.seen = self.ids()

    def ids(self) -> set[str]:
        exp = self.client.get_experiment_by_name("beyondlm")
        return {r.info.run_id for r in self.client.search_runs([exp.experiment_id], max_results=1000)} if exp else set()

    def new(self) -> tuple[list, list]:
        """(parent runs, stage runs) logged since the last call."""
        now = self.ids()
        runs = [self.client.get_run(i) for i in now - self.seen]
        self.seen = now
        return ([r for r in runs if "stage" not in r.data.tags], [r for r in runs if "stage" in r.data.tags])


@pytest.fixture(scope="module")
def harness(prefect_harness):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACT_ROOT"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness) -> Path:
    """The toy project after one full flow run (sqlite store in the project)."""
    root = tmp_path_factory.mktemp("noop")
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(DVC_YAML)
    set_params(root)
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    assert set(reproduce(root=str(root))) == {"a", "b", "c"}
    return root


def test_up_to_date_workspace_is_a_noop(project):
    runs = Runs(project)
    start = time.monotonic()
    out = sh(sys.executable, "-m", "pipelines.reproduce", cwd=project)  # no Prefect server started
    elapsed = time.monotonic() - start
    assert "nothing to do" in out.stdout
    assert elapsed < 10, f"no-op took {elapsed:.1f} s"
    parents, stages = runs.new()
    assert len(parents) == 1 and stages == []
    assert parents[0].data.tags["outcome"] == "nothing to do" and parents[0].info.status == "FINISHED"

    assert reproduce(root=str(project), workers=2) == []  # the flow itself (a deployment) too
    parents, stages = runs.new()
    assert len(parents) == 1 and stages == [] and parents[0].data.tags["outcome"] == "nothing to do"


def test_partly_stale_workspace_logs_only_the_stages_that_ran(project):
    runs = Runs(project)
    set_params(project, k=2)
    assert reproduce(root=str(project), workers=2) == ["b"]
    parents, stages = runs.new()
    assert len(parents) == 1 and [r.info.run_name for r in stages] == ["b"]
    assert parents[0].data.tags["stale"] == "b"
    (b,) = stages
    assert b.data.params == {"b.k": "2"} and b.data.metrics["k"] == 2 and b.data.metrics["stage/wall_s"] > 0
    assert b.data.tags["mlflow.parentRunId"] == parents[0].info.run_id

    # a reruns and writes the same data/a.txt: b stays up to date and is not logged
    first_a = next(r for r in runs.client.search_runs([b.info.experiment_id], "attributes.run_name = 'a'"))
    set_params(project, n=2, k=2)
    assert reproduce(root=str(project)) == ["a"]
    parents, stages = runs.new()
    assert len(parents) == 1 and [r.info.run_name for r in stages] == ["a"]
    (a,) = stages
    assert a.data.metrics["n"] == 2 and a.data.metrics["timing/wall_s"] == 0.25
    wall = a.data.metrics["stage/wall_s"]
    assert 0 < wall and a.info.end_time - a.info.start_time == pytest.approx(wall * 1000, abs=2)
    # data/a.txt has the md5 the first run logged: a pointer, no second copy
    tag = "artifact/data/a.txt"
    assert a.data.tags[tag] == first_a.data.tags[tag] == f"runs:/{first_a.info.run_id}/data/a.txt"
    assert [f.path for f in runs.client.list_artifacts(a.info.run_id, "data")] == []
    assert [f.path for f in runs.client.list_artifacts(first_a.info.run_id, "data")] == ["data/a.txt"]
    # reports/metrics/a.json changed ({"n": 2}): copied
    assert a.data.tags["artifact/reports/metrics/a.json"] == f"runs:/{a.info.run_id}/reports/metrics/a.json"
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=project).stdout) == {}


def test_a_run_drops_lock_entries_of_stages_no_longer_defined(project):
    """DVC keeps a removed (matrix) stage's lock entry; the flow drops it and leaves the rest as is."""
    from dvc.utils.serialize import modify_yaml

    lock = project / "dvc.lock"
    with modify_yaml(str(lock)) as data:
        data["stages"]["gone@x"] = dict(data["stages"]["c"])  # as if a matrix value was removed
    before = lock.read_text()
    set_params(project, n=2, k=2, m=3)
    assert reproduce(root=str(project)) == ["c"]
    after = lock.read_text()
    assert "gone@x" in before and "gone@x" not in after
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=project).stdout) == {}


def test_the_nightly_deployment_is_served_on_its_schedule_and_a_run_of_it_reproduces(project, tmp_path):
    """``python -m pipelines.deploy`` (README "Schedule") serves the reproduce flow on the Prefect
    server with its cron schedule; a run of the deployment, as the schedule starts one, runs the
    stale stage in the workspace it names."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import _kill_group

    set_params(project, n=2, k=5, m=3)
    env = {**_env(), "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.deploy", "--cron", "15 4 * * *", "--name",
                                 "nightly-test"], cwd=Path(__file__).resolve().parents[1], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("reproduce/nightly-test")
                    break
                except ObjectNotFound:
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
        assert [s.schedule.cron for s in deployment.schedules] == ["15 4 * * *"]
        assert {"beyondlm", "nightly"} <= set(deployment.tags)
        run = run_deployment("reproduce/nightly-test", parameters={"root": str(project)}, timeout=300)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    finally:
        _kill_group(proc)
    assert json.loads((project / "reports/metrics/b.json").read_text())["k"] == 5
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=project).stdout) == {}
