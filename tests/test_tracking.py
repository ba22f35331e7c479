"""beyondlm.tracking: helpers, a real MLflow server, an unreachable one, the sqlite default."""

import json
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from beyondlm.tracking import (ARTIFACT_ROOT_ENV, Tracker, artifact_root, dvc_lock_hashes, flatten,
                               git_commit, is_hf_model_dir, tracking_uri)

METRICS = {"eval": {"loss": 1.25, "acc": 0.5, "note": "ok"}, "steps": 5, "flag": True}
TIMING = {"wall_s": 3.5, "train": {"tokens_per_s": 100, "host": "box"}}  # untracked sibling
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
    """A tiny project: metrics + timing JSON, dvclive dir with a 5-step history, model dir, dvc.lock."""
    (root / "reports/metrics").mkdir(parents=True)
    (root / "reports/metrics/train.json").write_text(json.dumps(METRICS))
    (root / "reports/timing").mkdir(parents=True)
    (root / "reports/timing/train.json").write_text(json.dumps(TIMING))
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
        history_dirs=[Path("dvclive/train")], artifacts=[Path("models/train")],
        started=1700000000.0, wall_s=12.5)
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
    assert t.data.metrics == {"eval/loss": 1.25, "eval/acc": 0.5, "steps": 5.0, "train/loss": 0.75,
                              "timing/wall_s": 3.5, "timing/train/tokens_per_s": 100.0, "stage/wall_s": 12.5}
    assert (t.info.start_time, t.info.end_time) == (1700000000000, 1700000012500)  # the stage's, not ours
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


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty sqlite store, migrated once (a fresh one takes seconds): copy it or log into it."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def tags(client: MlflowClient, run_id: str) -> dict:
    return client.get_run(run_id).data.tags


def test_outputs_are_logged_once_per_content(migrated_db, tmp_path):
    root = make_project(tmp_path)
    uri = f"sqlite:///{migrated_db}"
    tracker = Tracker(uri=uri, root=root, experiment="once-per-content")
    first, again = (tracker.log_stage("train", artifacts=[Path("models/train")]) for _ in range(2))
    failed = tracker.log_stage("train", artifacts=[Path("models/train")], status="FAILED")
    (root / "dvc.lock").write_text(LOCK.replace("ccc333.dir", "ddd444.dir"))  # new content
    changed = tracker.log_stage("train", artifacts=[Path("models/train")])
    client, key = MlflowClient(uri), "artifact/models/train"
    files = {"models/train/config.json", "models/train/weights.bin"}
    assert {a.path for a in client.list_artifacts(first, "models/train")} == files
    assert tags(client, first)[key] == tags(client, again)[key] == f"runs:/{first}/models/train"
    assert client.list_artifacts(again) == []  # the pointer, no copy
    # a failed stage's outputs postdate dvc.lock: copied, never offered for reuse
    assert {a.path for a in client.list_artifacts(failed, "models/train")} == files
    assert key not in tags(client, failed)
    assert tags(client, changed)[key] == f"runs:/{changed}/models/train"
    assert {a.path for a in client.list_artifacts(changed, "models/train")} == files


def save_tiny_models(root: Path):
    """An LM and a reward model saved as the stages save them (beyondlm.models.save_model)."""
    from transformers import GPT2LMHeadModel

    from beyondlm.config import ModelConfig
    from beyondlm.data.tokenization import word_tokenizer
    from beyondlm.models import save_model, tiny_gpt2_config
    from beyondlm.reward import build_reward_model

    tok = word_tokenizer(["<|endoftext|>", "<unk>", "a", "b", "c"])
    size = dict(n_layer=1, n_head=2, n_embd=8, n_positions=16)
    save_model(GPT2LMHeadModel(tiny_gpt2_config(ModelConfig(**size), tok)), tok, root / "models/sft/tiny")
    save_model(build_reward_model(ModelConfig(**size), tok), tok, root / "models/reward")
    return tok


def test_hf_model_dirs_are_logged_as_mlflow_models(migrated_db, tmp_path, monkeypatch):
    import mlflow

    from beyondlm.data.tokenization import encode_texts
    from beyondlm.logprobs import sequence_logps
    from beyondlm.models import load_model
    from beyondlm.reward import score

    tok = save_tiny_models(tmp_path)
    (tmp_path / "models/align/dpo/s0").parent.mkdir(parents=True)
    shutil.copytree(tmp_path / "models/sft/tiny", tmp_path / "models/align/dpo/s0")  # one per seed
    assert is_hf_model_dir(tmp_path / "models/reward") and not is_hf_model_dir(tmp_path / "models/align/dpo")
    uri = f"sqlite:///{migrated_db}"
    tracker = Tracker(uri=uri, root=tmp_path, experiment="models")
    run = tracker.log_stage("models", artifacts=[Path("models/sft/tiny"), Path("models/reward"),
                                                 Path("models/align/dpo")])
    assert tracker.enabled
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # runs:/ and the registry resolve through it
    texts = ["a b c", "c", "b b"]
    seqs = encode_texts(tok, texts, 15)  # [BOS] words [EOS]
    lm = mlflow.pyfunc.load_model(f"runs:/{run}/models/sft/tiny")
    expected = sequence_logps(load_model(tmp_path / "models/sft/tiny"), seqs, pad_id=tok.pad_token_id)[0].tolist()
    assert lm.predict(texts) == pytest.approx(expected)
    assert mlflow.pyfunc.load_model(f"runs:/{run}/models/align/dpo/s0").predict(texts) == pytest.approx(expected)
    reward = load_model(tmp_path / "models/reward", kind="reward")
    expected_r = score(reward, seqs, pad_id=reward.config.pad_token_id).tolist()
    assert mlflow.pyfunc.load_model(f"runs:/{run}/models/reward").predict(texts) == pytest.approx(expected_r)
    version = mlflow.register_model(f"runs:/{run}/models/reward", "beyondlm-reward")
    registered = mlflow.pyfunc.load_model(f"models:/beyondlm-reward/{version.version}")
    assert registered.predict(texts) == pytest.approx(expected_r)


def test_artifact_root(tmp_path, monkeypatch):
    monkeypatch.delenv(ARTIFACT_ROOT_ENV, raising=False)
    assert artifact_root(tmp_path, "sqlite:///x.db") == (tmp_path / "mlartifacts").resolve().as_uri()
    assert artifact_root(tmp_path, "http://127.0.0.1:5000") is None  # the server decides
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, "store/art")  # relative to the project
    assert artifact_root(tmp_path, "http://h") == (tmp_path / "store/art").resolve().as_uri()
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, "s3://bucket/beyondlm")
    assert artifact_root(tmp_path, "sqlite:///x.db") == "s3://bucket/beyondlm"


def test_copied_project_logs_under_its_own_root(migrated_db, tmp_path, monkeypatch, caplog):
    """mlflow.db stores absolute artifact locations: a copy must not write into the original."""
    for var in ("MLFLOW_TRACKING_URI", ARTIFACT_ROOT_ENV):
        monkeypatch.delenv(var, raising=False)
    old = make_project(tmp_path / "old")
    shutil.copy(migrated_db, old / "mlflow.db")
    first = Tracker(root=old).log_stage("train", artifacts=[Path("models/train")])
    new = tmp_path / "new"
    shutil.copytree(old, new)
    with caplog.at_level(logging.WARNING, logger="beyondlm.tracking"):
        tracker = Tracker(root=new)
        run = tracker.log_stage("train", artifacts=[Path("models/train")])
        again = Tracker(root=new)  # the next run finds the new experiment: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.name == "beyondlm.tracking"]
    assert len(warnings) == 1, warnings
    assert str(old / "mlartifacts") in warnings[0] and str(new / "mlartifacts") in warnings[0]
    assert ARTIFACT_ROOT_ENV in warnings[0]
    assert again._experiment_id == tracker._experiment_id
    client = MlflowClient(tracker.uri)
    logged = Path(urlparse(client.get_run(run).info.artifact_uri).path)
    assert logged.is_relative_to(new / "mlartifacts")
    assert (logged / "models/train/weights.bin").is_file()
    # the old run's copy lies outside the new experiment: copied again, not pointed at
    assert tags(client, run)["artifact/models/train"] == f"runs:/{run}/models/train"
    assert Path(urlparse(client.get_run(first).info.artifact_uri).path).is_relative_to(old / "mlartifacts")
