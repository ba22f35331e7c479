"""The DVC remote (#12 item 3) on a toy project shaped like the real one (a persist checkpoint dir,
metrics, plots and a report, all cached; the project's own .dvc/config and .gitignore): reproduced,
pushed with the run-cache, then a fresh `git clone` pulls every output with `dvc status` clean and
no stage command run again. Once against the committed default (a local directory beside the
project), once against a real S3 server on 127.0.0.1 (moto). An unreachable S3 endpoint fails fast
with a clear error."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beyondlm import remote

ROOT = Path(__file__).resolve().parents[1]

# Each command appends its stage name to $RUN_LOG (outside every workspace): a stage that ran.
STEP = '''\
import json, os, sys
from pathlib import Path
import yaml
name, p = sys.argv[1], yaml.safe_load(open("params.yaml"))
with open(os.environ["RUN_LOG"], "a") as log:
    log.write(name + "\\n")
def put(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
if name == "prepare":
    put("data/prepared/tokens.txt", "x" * p["prepare"]["n"])
    put("reports/metrics/prepare.json", json.dumps({"n": p["prepare"]["n"]}))
elif name == "train":
    n = len(Path("data/prepared/tokens.txt").read_text())
    put("models/ckpt/done.json", "{}")
    put("models/sft/weights.txt", str(n * 2))
    put("reports/live/sft/loss.tsv", "step\\tloss\\n0\\t1.0\\n")
    put("reports/metrics/sft.json", json.dumps({"loss": 1.0 / n}))
else:
    put("reports/report.md", "# report\\n" + Path("reports/metrics/sft.json").read_text())
'''
DVC_YAML = '''\
stages:
  prepare:
    cmd: python step.py prepare
    deps: [step.py]
    params: [prepare.n]
    outs: [data/prepared]
    metrics: [reports/metrics/prepare.json]
  train:
    cmd: python step.py train
    deps: [step.py, data/prepared]
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
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
BUCKET = "beyondlm-test"


def _env(run_log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # config.local's keys only
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stage cmds: `python`
    env["RUN_LOG"] = str(run_log)
    return env


def sh(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def dvc(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env, ok=ok)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file under the toy project's output folders, by relative path."""
    return {str(f.relative_to(root)): f.read_bytes()
            for top in ("data", "models", "reports") for f in sorted((root / top).rglob("*")) if f.is_file()}


def make_origin(base: Path, env: dict[str, str]) -> Path:
    """The toy project with the real project's .dvc/config (default remote ../beyondlm-dvc-remote)
    and .gitignore, reproduced and committed."""
    root = base / "origin"
    root.mkdir()
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("prepare: {n: 3}\n")
    sh("git", "init", "-q", cwd=root, env=env)
    dvc("init", "-q", cwd=root, env=env)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    dvc("repro", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh(*GIT, "commit", "-q", "-m", "repro", cwd=root, env=env)
    return root


def use_s3(root: Path, url: str, env: dict[str, str]) -> None:
    """What README "DVC remote" tells an S3/MinIO user to run, keys in .dvc/config.local."""
    dvc("remote", "add", "--local", "-d", "s3", f"s3://{BUCKET}/dvc", cwd=root, env=env)
    for key, value in (("endpointurl", url), ("access_key_id", "testing"), ("secret_access_key", "testing")):
        dvc("remote", "modify", "--local", "s3", key, value, cwd=root, env=env)


@pytest.fixture
def bucket(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    yield s3_server
    for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    s3.delete_bucket(Bucket=BUCKET)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_fresh_clone_pulls_every_result_without_recomputing(kind, tmp_path, request):
    run_log = tmp_path / "runs.log"
    env = _env(run_log)
    origin = make_origin(tmp_path, env)
    if kind == "s3":
        use_s3(origin, request.getfixturevalue("bucket"), env)
    assert run_log.read_text().split() == ["prepare", "train", "report"]
    remote.push(origin, timeout_s=120)
    if kind == "local":  # the committed default: a directory beside the project
        assert any((tmp_path / "beyondlm-dvc-remote" / "files" / "md5").iterdir())

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, env=env)
    if kind == "s3":  # the same commands as in origin; config.local is never committed
        shutil.copy(origin / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    assert not (clone / "reports").exists()
    remote.pull(clone, timeout_s=120)

    assert outputs(clone) == outputs(origin) and len(outputs(origin)) == 7
    assert dvc("status", "--json", cwd=clone, env=env).stdout.strip() == "{}"
    repro = dvc("repro", cwd=clone, env=env)
    assert run_log.read_text().split() == ["prepare", "train", "report"], repro.stdout
    assert sh("git", "status", "--porcelain", cwd=clone, env=env).stdout == ""  # dvc.lock as pushed


@pytest.mark.slow
def test_run_cache_restores_a_stage_another_checkout_ran(tmp_path):
    """A worker's run (params changed, dvc.lock not committed) pushed with --run-cache: another
    checkout of the same params restores the stage from the remote instead of running it."""
    run_log = tmp_path / "runs.log"
    env = _env(run_log)
    origin = make_origin(tmp_path, env)
    remote.push(origin, timeout_s=120)  # HEAD's results
    (origin / "params.yaml").write_text("prepare: {n: 5}\n")
    dvc("repro", "--single-item", "prepare", cwd=origin, env=env)
    remote.push(origin, ("prepare",), timeout_s=120)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, env=env)
    (clone / "params.yaml").write_text("prepare: {n: 5}\n")
    remote.pull(clone, timeout_s=120)  # HEAD's outputs + the run-cache records
    repro = dvc("repro", "--pull", "--single-item", "prepare", cwd=clone, env=env)  # + their objects
    assert "skipping run" in repro.stdout + repro.stderr, repro.stdout
    assert run_log.read_text().split() == ["prepare", "train", "report", "prepare"]  # origin's only
    assert (clone / "data/prepared/tokens.txt").read_text() == "xxxxx"


@pytest.mark.slow
def test_unreachable_s3_fails_fast_with_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path / "runs.log")
    root = tmp_path / "p"
    root.mkdir()
    sh("git", "init", "-q", cwd=root, env=env)
    dvc("init", "-q", cwd=root, env=env)
    (root / "f.txt").write_text("x")
    dvc("add", "-q", "f.txt", cwd=root, env=env)
    (root / ".dvc" / "config.local").write_text(  # what use_s3 writes, without 4 dvc start-ups
        f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{BUCKET}/dvc\n"
        f"    endpointurl = http://127.0.0.1:{port}\n    access_key_id = testing\n"
        "    secret_access_key = testing\n")
    start = time.monotonic()
    with pytest.raises(remote.RemoteError, match=r"dvc push failed .*\n(.*\n)*.*Could not connect"):
        remote.push(root, timeout_s=60)
    assert time.monotonic() - start < 20
    (root / "f.txt").unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    start = time.monotonic()
    with pytest.raises(remote.RemoteError, match=r"dvc pull failed .*\n(.*\n)*.*Could not connect"):
        remote.pull(root, timeout_s=60)
    assert time.monotonic() - start < 20
    assert not (root / "f.txt").exists()


def test_dvc_in_this_process_captures_its_output_and_a_stage_error(tmp_path, monkeypatch, capfd):
    """``dvc_here`` (a dispatched stage's pull, repro and push without a new interpreter each):
    the exit code, DVC's words and the stage command's own stderr come back as text, nothing
    reaches this process's stdout/stderr, and both streams work as before afterwards; a push to a
    remote that does not answer is a RemoteError in seconds, as from a subprocess."""
    env = _env(tmp_path / "runs.log")
    root = tmp_path / "p"
    root.mkdir()
    sh("git", "init", "-q", cwd=root, env=env)
    dvc("init", "-q", cwd=root, env=env)
    (root / "dvc.yaml").write_text("stages:\n  ok:\n    cmd: echo made > out.txt\n    outs: [out.txt]\n"
                                   "  bad:\n    cmd: python -c \"raise SystemExit('bad.n must be positive')\"\n")
    monkeypatch.chdir(root)
    import importlib
    import logging
    import logging.config

    importlib.import_module("dvc.stage.run")  # its logger exists before the host configures logging (a long session)

    seen: list[logging.LogRecord] = []
    host = logging.Handler()  # the host process's own logging (a Prefect flow run's console)
    host.emit = seen.append
    logging.getLogger().addHandler(host)
    before = {n: (lg.disabled, lg.level) for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    logging.config.dictConfig({"version": 1, "incremental": False})  # disable_existing_loggers: the default
    logging.getLogger("dvc").setLevel(logging.WARNING)  # as a library quietening DVC would (seen in the suite)
    capfd.readouterr()
    try:
        code, output = remote.dvc_here("repro", "--single-item", "ok")
        assert code == 0 and "Running stage 'ok'" in output and (root / "out.txt").read_text() == "made\n"
        code, output = remote.dvc_here("repro", "--single-item", "bad")
    finally:
        logging.getLogger().removeHandler(host)
        assert logging.getLogger("dvc.stage.run").disabled and logging.getLogger("dvc").level == logging.WARNING
        for name, (disabled, level) in before.items():
            logging.getLogger(name).disabled = disabled
            logging.getLogger(name).setLevel(level)
    assert code != 0 and "bad.n must be positive" in output and "failed to reproduce 'bad'" in output
    assert "Traceback" not in output and not [r for r in seen if r.name.startswith("dvc")]
    print("after")
    assert capfd.readouterr().out == "after\n"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{BUCKET}/dvc\n"
        f"    endpointurl = http://127.0.0.1:{port}\n    access_key_id = testing\n    secret_access_key = testing\n")
    start = time.monotonic()
    with pytest.raises(remote.RemoteError, match=r"dvc push failed .*\n(.*\n)*.*Could not connect"):
        remote.push_here(("ok",))
    assert time.monotonic() - start < 20 and "AWS_MAX_ATTEMPTS" not in os.environ


def test_every_output_is_cached_and_a_default_remote_is_committed():
    """A `cache: false` output would be missing from a fresh clone after `dvc pull`."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        uncached = [f"{s.addressing}: {o.def_path}" for s in repo.index.stages for o in s.outs
                    if not o.use_cache]
        config = repo.config.read("repo")
    assert uncached == []
    name = config["core"]["remote"]
    assert config["remote"][name]["url"] == str(ROOT.parent / "beyondlm-dvc-remote")
    assert "url = ../../beyondlm-dvc-remote" in (ROOT / ".dvc" / "config").read_text()  # relative to .dvc/


@pytest.mark.slow
def test_existing_workspace_migrates_with_dvc_commit(tmp_path):
    """A workspace reproduced while metrics were `cache: false`: after the switch to cached outs a
    persist stage (no run-cache: sft, align, datastore, grf) says "not in cache"; `dvc commit -f`
    caches them, nothing runs again and dvc.lock keeps its bytes."""
    run_log = tmp_path / "runs.log"
    env = _env(run_log)
    root = tmp_path / "old"
    root.mkdir()
    (root / "step.py").write_text(STEP)
    (root / "params.yaml").write_text("prepare: {n: 3}\n")
    old = DVC_YAML.replace("metrics: [reports/metrics/sft.json]",
                           "metrics: [{reports/metrics/sft.json: {cache: false}}]")
    (root / "dvc.yaml").write_text(old)
    sh("git", "init", "-q", cwd=root, env=env)
    dvc("init", "-q", cwd=root, env=env)
    dvc("repro", cwd=root, env=env)
    lock = (root / "dvc.lock").read_bytes()
    (root / "dvc.yaml").write_text(DVC_YAML)
    assert "not in cache" in dvc("status", cwd=root, env=env).stdout
    dvc("commit", "-f", cwd=root, env=env)
    assert dvc("status", "--json", cwd=root, env=env).stdout.strip() == "{}"
    assert (root / "dvc.lock").read_bytes() == lock
    assert run_log.read_text().split() == ["prepare", "train", "report"]
