"""beyondlm.tracking: helpers, a real MLflow server, an unreachable one, the sqlite default."""

import json
import logging
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from beyondlm.tracking import Tracker, dvc_lock_hashes, flatten, git_commit, tracking_uri

METRICS = {"eval": {"loss": 1.25, "acc": 0.5, "note": "ok"}, "steps": 5, "flag": True}
HISTORY = [2.0, 1.5, 1.25, 1.0, 0.75]
LOCK = """\
schema: '2.0'
stages:
  train:
    cmd: python stages/train.py
    deps:
    - path: data/train.jsonl
      hash: md5
      md5: aaa111
      size: 10
    - path: stages/train.py
      md5: bbb222
    params:
      params.yaml:
        train.lr: 0.001
    outs:
    - path: models/train
      hash: md5
      md5: ccc333.dir
      size: 20
      nfiles: 2
  eval:
    cmd: python stages/eval.py
"""


def make_project(root: Path) -> Path:
    """A tiny project: metrics JSON, dvclive dir with a 5-step history, model dir, dvc.lock."""
    (root / "reports/metrics").mkdir(parents=True)
    (root / "reports/metrics/train.json").write_text(json.dumps(METRICS))
    curve = root / "dvclive/train/plots/metrics/train"
    curve.mkdir(parents=True)
    rows = "".join(f"{1700000000000 + i}\t{i}\t{v}\n" for i, v in enumerate(HISTORY))
    (curve / "loss.tsv").write_text("timestamp\tstep\tloss\n" + rows)
    (root / "models/train").mkdir(parents=True)
    (root / "models/train/config.json").write_text("{}")
    (root / "models/train/weights.bin").write_bytes(b"\0" * 8)
    (root / "dvc.lock").write_text(LOCK)
    return root


def log_two_stages(tracker: Tracker) -> tuple[str, str, str]:
    parent = tracker.start_pipeline("repro", params={"seed": 1}, tags={"who": "test"})
    train = tracker.log_stage(
        "train", params={"train": {"lr": 1e-3, "sched": {"warmup": 10}}},
        metrics_files=[Path("reports/metrics/train.json")],
        history_dirs=[Path("dvclive/train")], artifacts=[Path("models/train")])
    failed = tracker.log_stage("eval", metrics_files=[Path("reports/metrics/missing.json")],
                               status="FAILED")
    tracker.end_pipeline()
    return parent, train, failed


def check_logged(client: MlflowClient, parent: str, train: str, failed: str) -> None:
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.params == {"seed": "1"}
    assert p.data.tags["who"] == "test"
    t, f = client.get_run(train), client.get_run(failed)
    assert t.data.tags["mlflow.parentRunId"] == parent == f.data.tags["mlflow.parentRunId"]
    assert t.info.run_name == "train" and t.info.status == "FINISHED"
    assert f.info.run_name == "eval" and f.info.status == "FAILED"
    assert t.data.params == {"train/lr": "0.001", "train/sched/warmup": "10"}
    # strings and booleans are not metrics; the history's last value is the run's latest
    assert t.data.metrics == {"eval/loss": 1.25, "eval/acc": 0.5, "steps": 5.0, "train/loss": 0.75}
    hist = sorted(client.get_metric_history(train, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == list(enumerate(HISTORY))
    assert hist[0].timestamp == 1700000000000
    assert t.data.tags["stage"] == "train"
    assert t.data.tags["dvc/dep:data/train.jsonl"] == "aaa111"
    assert t.data.tags["dvc/dep:stages/train.py"] == "bbb222"
    assert t.data.tags["dvc/out:models/train"] == "ccc333.dir"
    assert not any(k.startswith("dvc/") for k in f.data.tags)
    files = {a.path for a in client.list_artifacts(train, "models/train")}
    assert files == {"models/train/config.json", "models/train/weights.bin"}


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {
        "a/b": 1, "a/c/d": "x", "e": [1, 2]}
    assert flatten({"a": {"b": 1}}, sep=".") == {"a.b": 1}
    assert flatten({}) == {}


def test_dvc_lock_hashes(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(LOCK)
    assert dvc_lock_hashes("train", lock) == {
        "dep:data/train.jsonl": "aaa111", "dep:stages/train.py": "bbb222",
        "out:models/train": "ccc333.dir"}
    assert dvc_lock_hashes("eval", lock) == {}
    assert dvc_lock_hashes("absent", lock) == {}
    assert dvc_lock_hashes("train", tmp_path / "nope.lock") == {}


def git_init_commit(root: Path) -> str:
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None  # pytest's tmp dirs live outside any repository
    subprocess.run(["git", "-C", str(tmp_path), "init", "-q"], check=True)
    assert git_commit(tmp_path) is None  # no commit yet
    sha = git_init_commit(tmp_path)
    assert len(sha) == 40 and git_commit(tmp_path) == sha


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:1"


@pytest.mark.slow
def test_server_roundtrip(mlflow_server, tmp_path, monkeypatch):
    root = make_project(tmp_path)
    monkeypatch.chdir(root)  # relative stage paths resolve against root either way
    tracker = Tracker(uri=mlflow_server, experiment="server-test", root=root)
    parent, train, failed = log_two_stages(tracker)
    assert tracker.enabled and tracker.parent_run_id == parent
    check_logged(MlflowClient(tracking_uri=mlflow_server), parent, train, failed)


def test_sqlite_default(tmp_path, monkeypatch):
    """The default mode: no server, sqlite file in the project root, artifacts in mlartifacts/."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(tmp_path)
    sha = git_init_commit(root)
    tracker = Tracker(root=root)
    assert tracker.uri == f"sqlite:///{root.resolve()}/mlflow.db"
    parent, train, failed = log_two_stages(tracker)
    assert (root / "mlflow.db").is_file()
    assert (root / "mlartifacts").is_dir()
    client = MlflowClient(tracking_uri=tracker.uri)
    check_logged(client, parent, train, failed)
    for run_id in (parent, train, failed):
        assert client.get_run(run_id).data.tags["mlflow.source.git.commit"] == sha


def test_unreachable_server_is_noop(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    root = make_project(tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="beyondlm.tracking"):
        tracker = Tracker(uri=uri, root=root)
        assert log_two_stages(tracker) == (None, None, None)
        assert tracker.parent_run_id is None and not tracker.enabled
    assert time.monotonic() - start < 15
    warnings = [r for r in caplog.records if r.name == "beyondlm.tracking"]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert "MLFLOW_TRACKING_URI" in warnings[0].getMessage()
