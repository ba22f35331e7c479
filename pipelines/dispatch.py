"""Dispatch the DVC pipeline to Prefect workers: each stage runs in its own checkout on a worker of
its work pool, its deps and outputs travel through the DVC remote, and the driver ends with one
consistent dvc.lock and every output in the user's workspace.

    python -m pipelines.dispatch setup --repo <git url>   # once: work pools + deployments
    prefect worker start --pool cpu                       # on any machine, as many as you like
    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1   # one per GPU
    python -m pipelines.dispatch run [stage ...] [--force]   # the driver, in your workspace

The engine is Prefect's: a ``prefect server`` (PREFECT_API_URL), ``process`` work pools ``cpu`` and
``gpu`` and one deployment of the ``dvc-stage`` flow on each (``dvc-stage/cpu``,
``dvc-stage/gpu``). A stage's pool comes from dvc.yaml (``meta: {pool: gpu}``; default ``cpu``).
Each flow run gets the code by the deployment's pull step (``git clone`` of ``--repo`` into the
run's own temporary directory) and checks out the commit being reproduced, so a worker never
shares the driver's path; it writes the driver's dvc.lock entries that it needs over the
checkout's (its stage's and those of the stages it reads from), pulls from the DVC remote what the
stage reads of other stages' outputs (its deps, not those stages' every output: the report pulls
metrics, not model weights), runs ``dvc repro --single-item <stage>``, pushes its outputs and the
run-cache (the three by DVC's CLI in the flow run's own process), and hands its dvc.lock entry back,
as DVC wrote it, in a Prefect artifact. The driver splices each entry into its dvc.lock as it
arrives (the next stage's checkout gets it) and ``dvc pull``s that stage's outputs in the
background while others run: at the end ``dvc status`` is clean and nothing was computed twice.

Faults: a flow run that crashes (its process killed, its machine lost: the deployments send flow
heartbeats and ``setup`` adds an automation marking a run silent for ``--zombie-after`` seconds
CRASHED) is submitted again, ``--retries`` times, to any worker of its pool; a stage whose command
fails stops the run (running stages finish, no more start) with the stage's name and error, and
nothing of it is pushed or merged. No server, no worker online in a needed pool, or an
unreachable remote: one clear error before any stage starts.

MLflow: the driver opens one parent run; with an MLflow server (http URI) each worker logs its
stage as a nested run (params, metrics, curves, outputs, its own wall time, host and device);
with a local store the driver mirrors each stage after pulling it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import yaml  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402

from beyondlm import remote  # noqa: E402
from beyondlm.config import ConfigError  # noqa: E402
from beyondlm.tracking import worker_device  # noqa: E402

FLOW = "dvc-stage"
POOLS = ("cpu", "gpu")
ENTRYPOINT = "pipelines/dispatch.py:dvc_stage"
LOCK_ARTIFACT = "dvc-lock"  # key prefix of the artifact carrying a stage's dvc.lock entry


class DispatchError(RuntimeError):
    """A dispatched run that cannot start or did not finish; the message says which and why."""


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DispatchError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def _slug(stage: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) naming ``stage``."""
    return "".join(c if c.isalnum() else "-" for c in f"{LOCK_ARTIFACT}-{stage}".lower())


# --- the worker side ------------------------------------------------------------------------------

def _checkout(root: Path, commit: str) -> None:
    """The commit being reproduced in the pull step's clone (a shallow one may lack it)."""
    if _git(root, "rev-parse", "HEAD") == commit:
        return
    fetched = subprocess.run(["git", "fetch", "-q", "origin", commit], cwd=root, capture_output=True, text=True)
    if fetched.returncode != 0:
        raise DispatchError(f"commit {commit} is not in {_git(root, 'remote', 'get-url', 'origin')}: push it "
                            f"there first ({fetched.stderr.strip()[-300:]})")
    _git(root, "checkout", "-q", "--detach", commit)


def _use_remote(root: Path, dvc_remote: dict) -> None:
    """The driver's DVC remote as this checkout's default, in ``.dvc/config.local`` (what ``dvc
    remote add --local -d`` writes; credentials come from this worker's environment or its own
    config, never from the driver)."""
    lines = ["[core]", "    remote = dispatch", "['remote \"dispatch\"']",
             *(f"    {k} = {v}" for k, v in dvc_remote.items())]
    (root / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")


@flow(name=FLOW, flow_run_name="{stage}")
def dvc_stage(stage: str, commit: str, lock: str, dvc_remote: dict, reads: list[str] | None = None,
              force: bool = False, tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """Run one DVC stage in this flow run's checkout (the pull step's clone, at ``commit``): a
    dvc.lock of the entries it needs (``lock``: its own and those of the stages it reads from),
    the paths it ``reads`` of other stages pulled from ``dvc_remote``, ``dvc repro --single-item``,
    outputs and run-cache pushed; DVC runs in this process (one import for the three commands).
    Returns the stage's dvc.lock entry, as DVC wrote it, and where it ran; the same is an
    artifact of this run, which the driver reads."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    root = Path.cwd()
    _checkout(root, commit)
    _use_remote(root, dvc_remote)
    if lock:
        (root / "dvc.lock").write_text(lock)
    else:  # the driver has none yet: neither may the checkout (a committed one is the driver's past)
        (root / "dvc.lock").unlink(missing_ok=True)
    if reads:
        logger.info("pulling %s", ", ".join(reads))
        remote.pull_here(tuple(reads))
    host, device = socket.gethostname(), worker_device()
    logger.info("running %s on %s (%s) at %s", stage, host, device, commit[:10])
    from pipelines.reproduce import _stage_env

    os.environ["PATH"] = _stage_env()["PATH"]  # the stage's `python` is this interpreter
    started, t0 = time.time(), time.perf_counter()
    code, output = remote.dvc_here("repro", "--single-item", *(["--force"] if force else []), stage)
    wall = time.perf_counter() - t0
    logger.info("%s", output[-8000:])
    where = {"host": host, "device": device, "started": started, "wall_s": round(wall, 3)}
    _log_stage(root, stage, code == 0, where, tracking_uri, parent_run_id)
    if code != 0:
        raise RuntimeError(f"stage {stage} failed on {host}:\n" + _error_lines(output))
    remote.push_here((stage,))
    result = {"stage": stage, "lock": lock_entries((root / "dvc.lock").read_text())[stage], **where}
    create_markdown_artifact(key=_slug(stage), description=f"dvc.lock entry of {stage}",
                             markdown=f"```yaml\n{yaml.safe_dump(result, sort_keys=False)}```\n")
    return result


def _error_lines(output: str, n: int = 4) -> str:
    """The last ``n`` lines of a failed command that say what failed (no traceback frames)."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln[0].isspace() and not ln.startswith("Traceback")]
    return "\n".join(f"  {ln}" for ln in lines[-n:])


def _log_stage(root: Path, stage: str, ok: bool, where: dict, tracking_uri: str | None,
               parent_run_id: str | None) -> None:
    """A nested MLflow run under the driver's parent run (``tracking_uri`` given: a server)."""
    if not tracking_uri:
        return
    from beyondlm.dvcgraph import pipeline_stages
    from beyondlm.tracking import Tracker
    from pipelines.reproduce import _mirror

    info = next(s for s in pipeline_stages(root, [stage]) if s.name == stage)
    tracker = Tracker(tracking_uri, root=root)
    tracker.attach(parent_run_id)
    _mirror(info, tracker, ok, where["started"], where["wall_s"], tags=_worker_tags(where))


def _worker_tags(where: dict) -> dict[str, str]:
    return {"worker/host": where["host"], "worker/device": where["device"]}


# --- the driver side ------------------------------------------------------------------------------

def stage_pools(root: Path) -> dict[str, str]:
    """Each stage's work pool: ``meta.pool`` in dvc.yaml, ``cpu`` when absent."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        pools = {s.name: ((s.meta or {}).get("pool") or "cpu") for s in repo.index.stages}
    if bad := {n: p for n, p in pools.items() if p not in POOLS}:
        raise DispatchError(f"dvc.yaml: meta.pool must be one of {list(POOLS)}, got {bad}")
    return pools


def stage_reads(root: Path) -> dict[str, list[str]]:
    """Per stage, the paths (relative to ``root``) it reads that other stages write: each dep that
    is or lies inside another stage's output, and each output that lies inside a dep (the report's
    ``reports/metrics`` gathers many stages' files). A worker pulls these, not its upstream
    stages' every output: the report needs their metrics, not their model weights."""
    return {stage: sorted(paths) for stage, paths in stage_inputs(root).items()}


def stage_inputs(root: Path) -> dict[str, dict[str, str]]:
    """Per stage, what :func:`stage_reads` lists, each path with the stage that writes it (whose
    dvc.lock entry a worker needs to pull it)."""
    from pathlib import PurePosixPath

    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
    writer = {PurePosixPath(o.def_path): s.name for s in stages for o in s.outs}
    below: dict[PurePosixPath, list[PurePosixPath]] = {}  # folder → the outputs inside it
    for out in writer:
        for folder in out.parents:
            below.setdefault(folder, []).append(out)
    inputs: dict[str, dict[str, str]] = {}
    for stage in stages:
        paths: dict[str, str] = {}
        for dep in stage.deps:
            if dep.__class__.__name__ == "ParamsDependency":
                continue
            path = PurePosixPath(dep.def_path)
            owner = next((writer[p] for p in (path, *path.parents) if p in writer), stage.name)
            if owner != stage.name:
                paths[str(path)] = owner  # the dep is (inside) another stage's output
            paths.update((str(o), writer[o]) for o in below.get(path, ()) if writer[o] != stage.name)  # reports/metrics/...
        inputs[stage.name] = paths
    return inputs


def dvc_remote_config(root: Path, name: str | None = None) -> dict:
    """The URL (absolute for a local directory) and endpoint settings of the DVC remote ``name``
    (default: core.remote) that workers are to use; credentials are left out on purpose."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        name = name or config["core"].get("remote")
        if not name or name not in config["remote"]:
            raise DispatchError(f"no DVC remote {name or '(core.remote unset)'}: add one (README 'DVC remote')")
        section = dict(config["remote"][name])
    keep = ("url", "endpointurl", "region")
    return {k: str(section[k]) for k in keep if k in section}


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DispatchError("dispatching needs a Prefect server: start one (`prefect server start`) and "
                            "set PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5):
            pass
    except OSError as exc:
        raise DispatchError(f"no Prefect server answers at {url} ({exc}): start it (`prefect server start`) "
                            "or fix PREFECT_API_URL") from exc
    return url


def _check_workers(client, pools: set[str], api_url: str) -> None:
    """Every pool the run needs exists and has a worker online: else stop before anything runs."""
    for pool in sorted(pools):
        try:
            workers = client.read_workers_for_work_pool(pool)
        except Exception as exc:  # noqa: BLE001 - ObjectNotFound or the server gone
            raise DispatchError(f"work pool {pool!r} not found at {api_url} ({type(exc).__name__}): "
                                f"run `python -m pipelines.dispatch setup --repo <git url>` first") from exc
        if not any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers):
            raise DispatchError(f"no worker online in work pool {pool!r}: start one with "
                                f"`prefect worker start --pool {pool}` in the project's environment")


@dataclass
class _Submitted:
    run_id: object
    tries: int


def _states(client, run_ids: list) -> dict:
    """The current state of each flow run, in one request (the server is shared with the workers:
    one read per run and second kept half a core of this 2-core machine busy)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
                                 limit=len(run_ids))
    return {run.id: run.state for run in runs}


def _read_entry(client, run_id) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    for art in arts:
        if art.key and art.key.startswith(LOCK_ARTIFACT):
            text = str(art.data).strip().removeprefix("```yaml").removesuffix("```")
            return yaml.safe_load(text)
    raise DispatchError(f"flow run {run_id} completed without its dvc.lock artifact")


# --- dvc.lock as text -------------------------------------------------------------------------------
# DVC rewrites dvc.lock with ruamel's round-trip YAML: ~1.3 s of a core for the default pipeline's
# 210 KB lock, paid by every `dvc repro` and by each merge of a finished stage. So the driver never
# round-trips it: a worker's checkout gets a lock holding only the entries it needs (its own and
# those of the stages whose outputs it pulls), hands back its entry as the text DVC wrote, and the
# driver splices that text into its lock, which stays byte-for-byte what DVC itself would write.

LOCK_HEADER = "schema: '2.0'\nstages:\n"


def lock_entries(text: str) -> dict[str, str]:
    """The stage entries of a dvc.lock, in file order, each as its exact text (``  name:`` and
    the lines below it)."""
    if not text.strip():
        return {}
    lines = text.splitlines(keepends=True)
    try:
        start = lines.index("stages:\n") + 1
    except ValueError:
        if yaml.safe_load(text).get("stages") in (None, {}):
            return {}  # "stages: {}"
        raise DispatchError(f"dvc.lock is not in DVC's layout (no 'stages:' line): {text[:200]!r}") from None
    entries: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            name = str(yaml.safe_load(line.strip()[:-1]))
            entries[name] = line
        elif name is None or not (line.startswith("    ") or not line.strip()):
            raise DispatchError(f"dvc.lock is not in DVC's layout at {line!r}")
        else:
            entries[name] += line
    return entries


def lock_text(entries: dict[str, str]) -> str:
    """A dvc.lock of these entries (as :func:`lock_entries` gives them); empty: no lock."""
    return LOCK_HEADER + "".join(entries.values()) if entries else ""


def _merge_lock(root: Path, stage: str, entry: str) -> None:
    """Put ``stage``'s entry (its text) into the workspace's dvc.lock in place of the old one, or
    after the others (where DVC puts a new stage), replacing the file in one step."""
    from beyondlm.io import atomic_path

    lock = root / "dvc.lock"
    entries = lock_entries(lock.read_text() if lock.exists() else "")
    entries[stage] = entry
    with atomic_path(lock) as tmp:  # whole: a `dvc pull` of a finished stage may be reading it meanwhile
        tmp.write_text(lock_text(entries))


@flow(name="reproduce-dispatched", log_prints=True)
def dispatch(targets: list[str] | None = None, root: str = ".", force: bool = False, retries: int = 2,
             tracking_uri: str | None = None, poll_s: float = 1.0, stale: list[str] | None = None) -> list[str]:
    """Run the stale stages (of all, or of ``targets`` and their upstream) and those downstream on
    Prefect workers; the names of the stages that ran, in the order they finished. ``stale``: what
    ``dvc status`` said a moment ago (asked again when not given)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    from beyondlm.dvcgraph import pipeline_stages
    from beyondlm.tracking import Tracker
    from pipelines.reproduce import _dependents, _downstream, _mirror, _status, prune_lock
    from pipelines.validate import validate_stages

    logger = get_run_logger()
    root_path = Path(root).resolve()
    api_url = _api_url()
    stages = pipeline_stages(root_path, targets)
    names = {s.name for s in stages}
    stale = names if force else names & (set(stale) if stale is not None else _status(str(root_path)))
    if not stale:
        logger.info("every stage is up to date: nothing to do")
        return []
    todo = _downstream(stages, stale)
    validate_stages(todo, str(root_path), device_checks=False)  # the workers' devices, not this one's
    if dirty := [ln for ln in _git(root_path, "status", "--porcelain", "--untracked-files=no").splitlines()
                 if not ln.endswith(" dvc.lock")]:
        raise DispatchError("workers check out a commit: commit (and push) these changes first: "
                            + ", ".join(ln[3:] for ln in dirty))
    commit = _git(root_path, "rev-parse", "HEAD")
    pools = stage_pools(root_path)
    dvc_remote = dvc_remote_config(root_path)
    tracker = Tracker(tracking_uri, root=root_path)
    workers_log = tracker.uri.startswith(("http://", "https://"))
    with get_client(sync_client=True) as client:
        _check_workers(client, {pools[s.name] for s in todo}, api_url)
        upstream = {s.name: list(s.upstream) for s in stages}  # all of it; todo's keeps only todo
        inputs = stage_inputs(root_path)
        upstream_done = sorted({u for t in todo for u in upstream[t.name]} - {t.name for t in todo})
        if upstream_done:  # up to date here: their outputs must be on the remote for the workers
            logger.info("pushing the outputs of %s", ", ".join(upstream_done))
            remote.push(root_path, tuple(upstream_done))
        tracker.start_pipeline("reproduce", params={"targets": targets or "all", "force": force, "dispatch": True},
                               tags={"stale": ", ".join(sorted(stale)), "commit": commit})
        by_name = {s.name: s for s in todo}
        rank = _dependents(todo)  # submitted first, picked first: the stage most others wait on
        pending, settled = sorted(todo, key=lambda s: -rank[s.name]), set()
        running: dict[str, _Submitted] = {}
        done: list[str] = []
        ran: dict[str, dict] = {}  # what each worker reported: lock entry, host, device, times
        failure: str | None = None
        collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")
        collected: list[Future] = []

        def collect(name: str) -> None:
            """A finished stage's outputs into the workspace (and its MLflow mirror with a local
            store) while the other stages run: nothing is left to pull at the end."""
            remote.pull(root_path, (name,), run_cache=False)
            if not workers_log:  # a local store: the stage's files are here now
                _mirror(by_name[name], tracker, True, ran[name]["started"], ran[name]["wall_s"],
                        tags=_worker_tags(ran[name]))

        def submit(info, tries: int) -> None:
            lock = root_path / "dvc.lock"
            entries = lock_entries(lock.read_text() if lock.exists() else "")
            needed = {info.name, *inputs[info.name].values()}  # its own entry, and those it pulls by
            run = run_deployment(
                f"{FLOW}/{pools[info.name]}", timeout=0, as_subflow=True,
                parameters={"stage": info.name, "commit": commit,
                            "lock": lock_text({k: v for k, v in entries.items() if k in needed}),
                            "dvc_remote": dvc_remote, "reads": sorted(inputs[info.name]), "force": force,
                            "tracking_uri": tracker.uri if workers_log else None,
                            "parent_run_id": tracker.parent_run_id if workers_log else None})
            running[info.name] = _Submitted(run.id, tries)
            logger.info("%s → pool %s (flow run %s%s)", info.name, pools[info.name], run.name,
                        f", try {tries + 1}" if tries else "")

        try:
            while running or (pending and failure is None):
                if failure is None:
                    for info in [s for s in pending if settled.issuperset(s.upstream)]:
                        pending.remove(info)
                        submit(info, 0)
                if not running:
                    raise DispatchError(f"stages {[s.name for s in pending]} wait on stages that never run")
                time.sleep(poll_s)
                states = _states(client, [sub.run_id for sub in running.values()])
                for name, sub in list(running.items()):
                    state = states.get(sub.run_id)
                    if state is None or not state.is_final():
                        continue
                    del running[name]
                    if state.type == StateType.COMPLETED:
                        entry = ran[name] = _read_entry(client, sub.run_id)
                        _merge_lock(root_path, name, entry["lock"])
                        settled.add(name)
                        done.append(name)
                        collected.append(collector.submit(collect, name))
                        logger.info("%s done on %s (%s) in %.1f s", name, entry["host"], entry["device"], entry["wall_s"])
                    elif state.type == StateType.CRASHED and sub.tries < retries and failure is None:
                        logger.warning("%s crashed (%s): submitting it again", name, state.message)
                        submit(by_name[name], sub.tries + 1)
                    else:
                        why = (state.message or "").split("RuntimeError: ", 1)[-1]  # the worker's words
                        failure = failure or f"{why}\n  (stage {name}: flow run {sub.run_id} {state.type.value.lower()})"
                        logger.error(failure)
            # also after a failure: dvc.lock names the stages that finished, so their outputs belong here
            collector.shutdown(wait=True)
            for pulled in collected:
                pulled.result()  # the first pull that failed, raised
            if failure:
                raise DispatchError(failure)
        except BaseException:
            collector.shutdown(wait=True, cancel_futures=True)
            tracker.end_pipeline("FAILED")
            raise
    prune_lock(str(root_path), None if targets else stages)
    tracker.end_pipeline("FINISHED")
    return done


# --- set-up ----------------------------------------------------------------------------------------

def setup(repo: str, branch: str | None = None, concurrency: dict[str, int] | None = None,
          heartbeat_s: int = 30, zombie_after_s: int = 90) -> list[str]:
    """Create the ``cpu`` and ``gpu`` process work pools (if missing), the deployments
    ``dvc-stage/cpu`` and ``dvc-stage/gpu`` whose pull step clones ``repo``, and the automation
    that marks a flow run CRASHED after ``zombie_after_s`` s without a heartbeat. Names created."""
    from prefect.automations import Automation, ChangeFlowRunState
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.runner.storage import GitRepository

    _api_url()
    made = []
    with get_client(sync_client=True) as client:
        existing = {p.name for p in client.read_work_pools()}
        for pool in POOLS:
            if pool not in existing:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                made.append(f"work pool {pool}")
            if concurrency and pool in concurrency:
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency[pool]))
    source = GitRepository(url=repo, branch=branch)
    for pool in POOLS:
        dvc_stage.from_source(source=source, entrypoint=ENTRYPOINT).deploy(
            name=pool, work_pool_name=pool, print_next_steps=False,
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}})
        made.append(f"deployment {FLOW}/{pool}")
    name = "beyondlm: crash silent dvc-stage runs"
    if not _has_automation(name):
        Automation(
            name=name,
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=zombie_after_s),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {zombie_after_s} s: the worker was lost")],
        ).create()
        made.append(f"automation {name!r}")
    return made


def _has_automation(name: str) -> bool:
    from prefect.automations import Automation

    try:
        return Automation.read(name=name) is not None
    except ValueError:  # prefect raises when no automation has the name
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="work pools, deployments and the lost-worker automation")
    s.add_argument("--repo", required=True, help="git URL workers clone (a path works on one machine)")
    s.add_argument("--branch", default=None)
    s.add_argument("--limit", action="append", default=[], metavar="POOL=N", help="pool concurrency limit")
    r = sub.add_parser("run", help="reproduce on the workers")
    r.add_argument("targets", nargs="*")
    r.add_argument("--force", action="store_true")
    r.add_argument("--retries", type=int, default=2, help="resubmissions of a crashed stage (default 2)")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the flow runs (default 1)")
    args = p.parse_args(argv)
    from beyondlm.dvcgraph import pipeline_stages
    from pipelines.reproduce import _status

    try:
        _api_url()  # before Prefect's client retries an unreachable server for a minute
        if args.cmd == "setup":
            limits = {k: int(v) for k, v in (x.split("=", 1) for x in args.limit)}
            print("\n".join(setup(args.repo, args.branch, limits)) or "nothing to create")
        elif not args.force and not (stale := _status(".")) & {s.name for s in pipeline_stages(".", args.targets or None)}:
            print("every stage is up to date: nothing to do")  # before any flow starts
        else:
            ran = dispatch(args.targets or None, force=args.force, retries=args.retries, poll_s=args.poll,
                           stale=None if args.force else sorted(stale))
            print("ran:", ", ".join(ran) or "nothing")
    except (DispatchError, remote.RemoteError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
