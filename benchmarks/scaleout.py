"""Scale-out bench (#12): the default pipeline from scratch, one stage after another vs two
workers, on this machine, in one run.

Clones of HEAD side by side (``seq/``, ``workers/``, ``dispatched/``; params from ``--params`` if given,
committed), each timed in turn:

- sequential: ``python -m pipelines.reproduce`` (one ``dvc repro --single-item`` after another);
- workers: ``python -m pipelines.reproduce --workers N`` (``make repro``'s path: independent stages
  N at a time in one workspace, ``cpu_count // N`` torch threads each: 1 on this 2-core machine);
- dispatched: a real ``prefect server``, ``python -m pipelines.dispatch setup --repo dispatched/``, one
  ``cpu`` worker and ``--gpu-workers`` ``gpu`` workers (``--limit 1`` each), the directory DVC
  remote beside the clones, then ``python -m pipelines.dispatch run`` and a second, no-op run.

Every stage process gets ``--threads`` torch threads on every side (default 1: the tiny default
models train fastest on one thread here, and equal threads make the sides' results comparable).
Written: wall times, each side's speed-up over sequential, the load average before and after each
side, and which metrics files are byte-identical to the sequential workspace's (those that differ
are listed: a stage whose numbers depend on thread scheduling, or a bug).

    python -m benchmarks.scaleout [--params tests/data/micro_params.yaml] [--keep DIR]
                                  [--sides sequential,workers,dispatched]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

from beyondlm.io import write_json

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]


def _env(threads: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def _clone(dest: Path, params: Path | None) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    if params is not None:
        shutil.copy(params, dest / "params.yaml")
        subprocess.run([*GIT, "commit", "-qam", f"bench params: {params.name}"], cwd=dest, check=True)
    return dest


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(cmd: list[str], cwd: Path, env: dict, log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not up after {timeout_s} s")
            time.sleep(0.5)


def _timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}) in {cwd}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "load_average_before": before, "load_average_after": os.getloadavg()}


def _metrics(root: Path) -> dict[str, bytes]:
    base = root / "reports" / "metrics"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.json"))}


def _compare(seq: Path, other: Path) -> dict:
    """Which metrics files of ``other`` are byte-identical to the sequential workspace's."""
    a, b = _metrics(seq), _metrics(other)
    same = sorted(k for k in a if b.get(k) == a[k])
    return {"metrics_files": len(a), "metrics_identical": len(same),
            "metrics_differing": sorted(set(a) ^ set(b) | {k for k in a if k in b and a[k] != b[k]})}


def _status(work: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=work, env=env,
                         capture_output=True, text=True).stdout.strip()
    return json.loads(out or "{}")


def _workers(work: Path, base: Path, threads: int, workers: int) -> dict:
    """``make repro``'s path; the flow sets each stage's threads itself (cpu_count // workers)."""
    env = _env(threads)
    run = _timed([sys.executable, "-m", "pipelines.reproduce", "--workers", str(workers)], work, env,
                 base / "workers.log")
    noop = _timed([sys.executable, "-m", "pipelines.reproduce", "--workers", str(workers)], work, env,
                  base / "workers-noop.log")
    return {**run, "noop_wall_s": noop["wall_s"], "dvc_status_after": _status(work, env), "workers": workers,
            "threads_per_stage": max(1, (os.cpu_count() or 1) // workers)}


def _dispatched(work: Path, base: Path, threads: int, gpu_workers: int) -> dict:
    port = _port()
    env = _env(threads, PREFECT_HOME=str(base / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    prefect = str(Path(sys.executable).with_name("prefect"))
    with ExitStack() as stack:
        server = stack.enter_context(_process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                              base, env, base / "prefect-server.log"))
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180, server, base / "prefect-server.log")
        subprocess.run([sys.executable, "-m", "pipelines.dispatch", "setup", "--repo", str(work)], cwd=work,
                       env=env, check=True, capture_output=True)
        wenv = {**env, "PREFECT_WORKER_QUERY_SECONDS": "3"}  # default 10; 1 s kept the server busy
        for pool, n in (("cpu", 1), ("gpu", gpu_workers)):
            for i in range(n):
                stack.enter_context(_process([prefect, "worker", "start", "--pool", pool, "--name", f"{pool}-{i}",
                                              "--limit", "1"], base, wenv, base / f"worker-{pool}-{i}.log"))
        time.sleep(10)  # workers register (the driver checks and names a pool without one)
        run = _timed([sys.executable, "-m", "pipelines.dispatch", "run"], work, env, base / "dispatch.log")
        noop = _timed([sys.executable, "-m", "pipelines.dispatch", "run"], work, env, base / "dispatch-noop.log")
        stats = _flow_run_stats(f"http://127.0.0.1:{port}/api")
    return {**run, "noop_wall_s": noop["wall_s"], "dvc_status_after": _status(work, env),
            "workers": {"cpu": 1, "gpu": gpu_workers}, "stage_flow_runs": stats}


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _flow_run_stats(api: str) -> dict:
    """Where a dispatched stage's time goes, from the Prefect server: per stage flow run, the
    seconds from its submission to its start (waiting for a free worker, the worker's poll, the
    run's process and pull step) and, once started, the seconds that are not its stage command
    (checkout, DVC pull and push, reporting), as median and sum."""
    import statistics
    from datetime import datetime

    import yaml

    walls = {}
    for art in _post(f"{api}/artifacts/filter", {"artifacts": {"key": {"like_": "dvc-lock"}}, "limit": 200}):
        text = str(art["data"]).strip().removeprefix("```yaml").removesuffix("```")
        walls[art["flow_run_id"]] = float(yaml.safe_load(text)["wall_s"])
    runs = [r for r in _post(f"{api}/flow_runs/filter", {"limit": 200}) if r["id"] in walls]
    t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    waited = [(t(r["start_time"]) - t(r["created"])).total_seconds() for r in runs]
    around = [(t(r["end_time"]) - t(r["start_time"])).total_seconds() - walls[r["id"]] for r in runs]
    summary = lambda xs: {"median": round(statistics.median(xs), 2), "sum": round(sum(xs), 1)}  # noqa: E731
    return {"n": len(runs), "stage_command_s": summary([walls[r["id"]] for r in runs]),
            "submitted_to_started_s": summary(waited), "started_not_in_command_s": summary(around)}


SIDES = ("sequential", "workers", "dispatched")


def scaleout_bench(params: Path | None = None, threads: int = 1, gpu_workers: int = 2, keep: Path | None = None,
                   reuse: Path | None = None, sides: tuple[str, ...] = SIDES, out: Path | None = None) -> dict:
    """``reuse``: a workspace of an earlier sequential run (its ``seq/`` and ``sequential.json``,
    as ``--keep`` leaves them) instead of running that side again; the result says so.
    ``sides``: which of ``workers`` and ``dispatched`` to time against the sequential run.
    ``out``: the result so far is written there after each side (a long run stopped early keeps
    what it measured)."""
    unknown = set(sides) - set(SIDES)
    if unknown or "sequential" not in sides:
        raise ValueError(f"--sides {','.join(sides)}: choose sequential and any of workers, dispatched")
    with tempfile.TemporaryDirectory(dir=keep.parent if keep else None) as tmp:
        base = Path(tmp)
        if reuse:
            seq = reuse / "seq"
            sequential = {**json.loads((reuse / "sequential.json").read_text()), "carried_over": str(reuse)}
        else:
            seq = _clone(base / "seq", params)
            sequential = _timed([sys.executable, "-m", "pipelines.reproduce"], seq, _env(threads), base / "sequential.log")
            (base / "sequential.json").write_text(json.dumps(sequential))
        result = {
            "params": str(params or "params.yaml"), "commit": subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
            "cpus": os.cpu_count(), "torch_threads_per_stage": threads, "sequential": sequential,
            "target_speedup": 1.4, "target_noop_s": 30,
        }
        runners = {"workers": lambda w: _workers(w, base, threads, gpu_workers),
                   "dispatched": lambda w: _dispatched(w, base, threads, gpu_workers)}
        for side in (s for s in SIDES[1:] if s in sides):
            work = _clone(base / side, params)
            timed = runners[side](work)
            result[side] = {**timed, "speedup": round(sequential["wall_s"] / timed["wall_s"], 3),
                            **_compare(seq, work)}
            result[side]["met"] = result[side]["speedup"] >= 1.4 and timed["noop_wall_s"] <= 30
            if out is not None:
                write_json(out, result)
        if keep:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(base, keep, symlinks=True, ignore=shutil.ignore_patterns("models", ".dvc", "data", ".git"))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=None, help="params file for both clones (default: HEAD's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu-workers", type=int, default=2, help="gpu workers (dispatched), stages at once (workers)")
    p.add_argument("--sides", default=",".join(SIDES), help="sequential plus any of workers, dispatched")
    p.add_argument("--keep", type=Path, default=None, help="copy logs and reports here")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "scaleout.json")
    p.add_argument("--reuse-sequential", type=Path, default=None, metavar="DIR",
                   help="an earlier run's --keep dir: reuse its sequential side (says so in the JSON)")
    args = p.parse_args()
    result = scaleout_bench(args.params and args.params.resolve(), args.threads, args.gpu_workers, args.keep,
                            args.reuse_sequential and args.reuse_sequential.resolve(),
                            tuple(args.sides.split(",")), args.out)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
