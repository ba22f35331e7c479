"""Shared pytest fixtures."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _served(cmd: list[str], cwd: Path, health_url: str, name: str, timeout_s: float,
            env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``cmd`` (own process group, log in ``cwd/server.log``) until ``health_url`` answers 200;
    kill the whole group on exit. Fails the test with the log's tail if it exits or never answers."""
    log_path = cwd / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)  # own process group: kill workers too
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not up after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield
    finally:
        _kill_group(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); yields its URL.

    One per session: a fresh sqlite store runs schema migrations that take seconds.
    """
    tmp = tmp_path_factory.mktemp("mlflow_server")
    url = f"http://127.0.0.1:{(port := _free_port())}"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
           "--artifacts-destination", str(tmp / "artifacts")]
    with _served(cmd, tmp, f"{url}/health", "mlflow server", 90):
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (`moto_server`, in memory) on 127.0.0.1; yields its URL. Any access key
    is accepted; buckets are the caller's to create."""
    tmp = tmp_path_factory.mktemp("s3_server")
    url = f"http://127.0.0.1:{(port := _free_port())}"
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    with _served(cmd, tmp, f"{url}/moto-api/", "moto_server", 60):
        yield url


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server for the session (starting one takes ~10-20 s here)."""
    from prefect.testing.utilities import prefect_test_harness

    # its telemetry heartbeat races the server's own sqlite writes ("database is locked")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def offline_hub(monkeypatch, tmp_path_factory):
    """No hub: ``HF_HUB_OFFLINE=1`` and empty Hugging Face caches in a temp dir, for this process
    (the constants transformers and datasets read at call time) and its subprocesses (``HF_HOME``).
    Restores everything ``beyondlm.hub.go_offline`` changes; yields the hub cache directory."""
    import datasets.config
    from huggingface_hub import constants

    from beyondlm import hub

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    hub.hub_reachable.cache_clear()
    yield home / "hub"
    hub.hub_reachable.cache_clear()
