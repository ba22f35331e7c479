"""Mirror what DVC stages wrote into MLflow: a parent run per pipeline run, a nested run per stage.

- parent (``start_pipeline``): name = pipeline, params flattened, tags = git commit + caller's.
- stage (``log_stage``): name = stage, tag ``mlflow.parentRunId``, start/end = the stage's own;
  params flattened; metrics = numeric leaves of the metrics JSONs (step 0), of their untracked
  timing siblings (``timing/...``, see ``beyondlm.io.timing_path``), ``stage/wall_s`` and dvclive
  ``plots/metrics/**/*.tsv`` histories; tags = ``stage``, git commit, ``dvc/dep:<path>`` /
  ``dvc/out:<path>`` md5s from dvc.lock; artifacts at their path relative to the project root.
- artifacts once per content: an output whose dvc.lock md5 an earlier run of the experiment
  already logged gets only the tag ``artifact/<path>`` = ``runs:/<that run>/<path>`` (the run that
  copies it tags itself the same way). Model directories saved with their tokenizer
  (``beyondlm.models.save_model``: sft, align seeds, reward) are logged as MLflow pyfunc models
  (``beyondlm.mlflow_models``): ``mlflow.pyfunc.load_model("runs:/<run>/models/sft/mle-s0")``;
  others (vq: its own layout, a prior without a tokenizer) as plain files.
- artifact locations: ``$MLFLOW_ARTIFACT_ROOT`` (a path relative to the project, or a URI), else
  ``<root>/mlartifacts`` with a sqlite store. An experiment whose location lies elsewhere (the
  project was copied or moved: mlflow.db stores absolute locations) is left to its runs; new runs
  go to an experiment ``<name> @ <location>``, with one warning.

Only ``MlflowClient`` with explicit run ids (no global active run): stages may log from threads.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from beyondlm.io import timing_path

# MLflow 3.17's telemetry thread (started by the first logged event) fails offline and then pops
# an env var while requests iterates os.environ for proxies in our thread: a random KeyError that
# would disable the Tracker. Telemetry is useless offline; an explicit user setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.credentials import get_default_host_creds  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID  # noqa: E402
from mlflow.utils.rest_utils import http_request  # noqa: E402
from mlflow.utils.validation import (  # noqa: E402
    MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH)

# HFModel re-exported: models logged before it moved pickled it as beyondlm.tracking.HFModel.
from beyondlm.mlflow_models import HFModel, holds_hf_models, is_hf_model_dir, log_model  # noqa: E402,F401

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"  # relative to the project root; MLflow >= 3.13 refuses ./mlruns
ARTIFACT_ROOT_ENV = "MLFLOW_ARTIFACT_ROOT"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow's allowed charset for metric/param/tag keys


def worker_device() -> str:
    """Where this process's stages train, for a dispatched stage's ``worker/device`` tag: the first
    visible GPU with its name, else ``cpu`` (torch is imported only on a machine with an NVIDIA
    driver). Here, not in pipelines/dispatch.py, so that it imports without Prefect."""
    import shutil

    if shutil.which("nvidia-smi") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != "":
        try:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        except Exception:  # noqa: BLE001 - a broken CUDA set-up still reports where it ran
            pass
    return "cpu"


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute ``sqlite:///<root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}"


def artifact_root(root: Path, uri: str) -> str | None:
    """Where this project's experiment keeps artifacts: ``$MLFLOW_ARTIFACT_ROOT`` (a relative path
    is relative to ``root``), else ``<root>/mlartifacts`` for a sqlite store, else None (a tracking
    server decides)."""
    env = os.environ.get(ARTIFACT_ROOT_ENV)
    if env:
        return env if len(urlparse(env).scheme) > 1 else (Path(root) / env).resolve().as_uri()
    return (Path(root) / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None


def _within(location: str, base: str) -> bool:
    """Whether artifact URI ``location`` is ``base`` or below it (paths compared resolved)."""
    loc, top = urlparse(location), urlparse(base)
    if loc.scheme in ("", "file") and top.scheme in ("", "file"):
        return Path(unquote(loc.path)).resolve().is_relative_to(Path(unquote(top.path)).resolve())
    return location.rstrip("/") == base.rstrip("/") or location.startswith(base.rstrip("/") + "/")


def flatten(d: Mapping, sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; non-mapping values are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()})
        else:
            flat[str(key)] = value
    return flat


def git_commit(root: Path) -> str | None:
    """HEAD sha of the git repository holding ``root``; None outside git or before a commit."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def dvc_lock_hashes(stage: str, lock_path: Path) -> dict[str, str]:
    """``{"dep:<path>": md5, "out:<path>": md5}`` for ``stage`` in dvc.lock; {} if absent.

    In DVC 3 locks ``hash`` names the algorithm (``hash: md5``) and ``md5`` holds the value.
    """
    try:
        lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    hashes = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind) or []:
            value = item.get("md5") or item.get("checksum") or item.get("etag")
            if value:
                hashes[f"{kind[:-1]}:{item['path']}"] = str(value)
    return hashes


def _key(name: str) -> str:
    """A valid MLflow key: allowed charset, no empty/'.'/'..' segments, ≤ 250 chars."""
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(name)).split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:MAX_ENTITY_KEY_LENGTH] or "_"


def _read_history(tsv: Path, key: str) -> list[Metric]:
    """One Metric per row of a dvclive tsv (``[timestamp\\t]step\\t<name>``); bad rows skipped."""
    with open(tsv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        value_cols = [c for c in reader.fieldnames or [] if c not in ("step", "timestamp")]
        if len(value_cols) != 1:
            return []
        points, now = [], int(time.time() * 1000)
        for row in reader:
            try:
                ts = int(float(row["timestamp"])) if row.get("timestamp") else now
                points.append(Metric(key, float(row[value_cols[0]]), ts, int(float(row["step"]))))
            except (KeyError, TypeError, ValueError):
                continue
    return points


def _ping(uri: str) -> None:
    """Raise within seconds if an http(s) server is down (MLflow's default: 7 retries x 120 s).

    Explicit arguments instead of MLFLOW_HTTP_REQUEST_* env vars: mutating os.environ while other
    threads make requests is itself racy (see the telemetry note above).
    """
    if uri.startswith(("http://", "https://")):
        creds = get_default_host_creds(uri)
        http_request(creds, "/health", "GET", max_retries=0, timeout=5).raise_for_status()


def _safe(method):
    """No-op (None) once disabled; the first exception disables the tracker with one warning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._client is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- tracking must never crash the pipeline
            self._disable(exc)
            return None

    return wrapper


class Tracker:
    """Thin MLflow client wrapper that never crashes the pipeline: on the first MLflow error it
    warns once (naming the URI and the fix) and every later call is a no-op returning None."""

    def __init__(self, uri: str | None = None, experiment: str = "beyondlm",
                 root: Path | None = None):
        self.root = Path(root or Path.cwd()).resolve()
        self.uri = uri or tracking_uri(self.root)
        self._parent: str | None = None
        self._commit = git_commit(self.root)
        self._client: MlflowClient | None = None
        self._lock = threading.Lock()
        try:
            self._client = MlflowClient(tracking_uri=self.uri)  # no I/O for http; sqlite migrates
            _ping(self.uri)
            self._experiment_id = self._experiment(experiment)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def _experiment(self, name: str) -> str:
        """Id of experiment ``name`` (created if missing) keeping artifacts under
        :func:`artifact_root`; if its location lies elsewhere, of ``<name> @ <location>`` (created
        with one warning: a project that was copied or moved)."""
        location = artifact_root(self.root, self.uri)
        exp = self._client.get_experiment_by_name(name)
        if exp is not None and location is not None and not _within(exp.artifact_location, location):
            old, name = exp, f"{name} @ {location}"
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                log.warning("MLflow experiment %r keeps its artifacts in %s, outside %s (the project "
                            "was copied or moved; mlflow.db stores absolute locations): logging to a "
                            "new experiment %r. Fix: set %s=<dir> to choose the artifact root, or start "
                            "a fresh mlflow.db; runs logged before keep their old locations.",
                            old.name, old.artifact_location, location, name, ARTIFACT_ROOT_ENV)
        if exp is not None:
            return exp.experiment_id
        return self._client.create_experiment(name, artifact_location=location)

    def _disable(self, exc: BaseException) -> None:
        with self._lock:  # warn once even when several stage threads fail together
            if self._client is None:
                return
            self._client = None
        log.warning("MLflow tracking at %s failed (%s: %s); tracking is off for the rest of this "
                    "run. Fix: start the server (`mlflow server --host 127.0.0.1 --port 5000`) or "
                    "set MLFLOW_TRACKING_URI (serverless default: %s).", self.uri,
                    type(exc).__name__, str(exc)[:300], f"sqlite:///{self.root / 'mlflow.db'}")

    @property
    def parent_run_id(self) -> str | None:
        return self._parent

    def attach(self, parent_run_id: str | None) -> None:
        """Nest this tracker's stage runs under a parent run another process started (a
        dispatched stage logging under its driver's run)."""
        self._parent = parent_run_id

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _base_tags(self, tags: Mapping | None) -> dict[str, str]:
        base = {MLFLOW_GIT_COMMIT: self._commit} if self._commit else {}
        return {**base, **{_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in (tags or {}).items()}}

    def _log_params(self, run_id: str, params: Mapping | None) -> None:
        """Flattened params, values stringified and cut to MLflow's 6000-char limit."""
        flat = {_key(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(params or {}).items()}
        items = [Param(k, v) for k, v in flat.items()]  # dict first: sanitized keys may collide
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):  # 1000 a request
            self._client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def _path(self, p: Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() else self.root / p

    @_safe
    def start_pipeline(self, name: str, params: Mapping | None = None,
                       tags: Mapping | None = None) -> str | None:
        """Create the parent run (RUNNING) with params and tags (git commit included)."""
        run = self._client.create_run(self._experiment_id, run_name=name,
                                      tags={"pipeline": name, **self._base_tags(tags)})
        self._parent = run.info.run_id
        self._log_params(self._parent, params)
        return self._parent

    @_safe
    def log_stage(self, stage: str, *, params: Mapping | None = None,
                  metrics_files: Sequence[Path] = (), history_dirs: Sequence[Path] = (),
                  artifacts: Sequence[Path] = (), tags: Mapping | None = None,
                  status: str = "FINISHED", started: float | None = None,
                  wall_s: float | None = None) -> str | None:
        """One run named ``stage`` (nested under the parent if any) holding what the stage wrote;
        ``started`` (epoch s) and ``wall_s`` (the command's) set its start and end time.

        Missing files are skipped, so a crashed stage (``status="FAILED"``) logs what exists;
        its outputs are copied, never indexed by a dvc.lock md5 (the lock predates them).
        """
        dvc = dvc_lock_hashes(stage, self.root / "dvc.lock")
        run_tags = {"stage": stage, **{f"dvc/{k}": v for k, v in dvc.items()}, **(tags or {})}
        if self._parent:
            run_tags[MLFLOW_PARENT_RUN_ID] = self._parent
        start_ms = int(started * 1000) if started is not None else None
        run_id = self._client.create_run(self._experiment_id, run_name=stage, start_time=start_ms,
                                         tags=self._base_tags(run_tags)).info.run_id
        self._log_params(run_id, params)
        timing = [timing_path(self._rel(p)) for p in metrics_files]
        own = [Metric("stage/wall_s", float(wall_s), int(time.time() * 1000), 0)] if wall_s is not None else []
        self._log_metrics(run_id, self._json_metrics(metrics_files) + self._json_metrics(timing, "timing/")
                          + own + self._histories(history_dirs))
        for art in map(self._path, artifacts):
            md5 = dvc.get(f"out:{self._rel(art)}") if status == "FINISHED" else None
            self._log_output(run_id, art, md5)
        end_ms = start_ms + int(wall_s * 1000) if start_ms is not None and wall_s is not None else None
        self._client.set_terminated(run_id, status=status, end_time=end_ms)
        return run_id

    def _json_metrics(self, files: Sequence[Path], prefix: str = "") -> list[Metric]:
        """Numeric leaves at step 0, key ``<prefix><json stem>/<flat key>`` (no stem if 1 file)."""
        metrics, now = [], int(time.time() * 1000)
        for path in (p for p in map(self._path, files) if p.is_file()):
            key_prefix = prefix + (f"{path.stem}/" if len(files) > 1 else "")
            try:  # a crashed stage may leave a truncated file: skip it, keep logging the rest
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable metrics file %s: %s", path, exc)
                continue
            for k, v in flatten(data).items():
                # bools/strings skipped; NaN is kept, MLflow stores ±inf as ±1.8e308
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics.append(Metric(_key(key_prefix + k), float(v), now, 0))
        return metrics

    def _histories(self, dirs: Sequence[Path]) -> list[Metric]:
        """``<dir>/plots/metrics/<name>.tsv`` -> history ``<name>`` (``<dir>/<name>`` if >1 dir)."""
        metrics = []
        for d in map(self._path, dirs):
            base = d / "plots" / "metrics"
            for tsv in sorted(base.rglob("*.tsv")) if base.is_dir() else []:
                name = tsv.relative_to(base).with_suffix("").as_posix()
                metrics += _read_history(tsv, _key(f"{d.name}/{name}" if len(dirs) > 1 else name))
        return metrics

    def _rel(self, path: Path) -> str:
        """``path`` relative to the root (posix), or its name if it lies outside."""
        try:
            return self._path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).name

    def _log_output(self, run_id: str, path: Path, md5: str | None) -> None:
        """Copy ``path`` unless a run of this experiment already holds the same dvc.lock ``md5``
        of it; either way tag ``artifact/<path>`` with the ``runs:/`` URI of the copy."""
        rel = self._rel(path)
        pointer, holder = _key(f"artifact/{rel}"), None
        if md5:
            found = self._client.search_runs(
                [self._experiment_id], max_results=1,
                filter_string=f"tags.`{_key(f'dvc/out:{rel}')}` = '{md5}' and tags.`{pointer}` LIKE 'runs:/%'")
            holder = found[0].data.tags[pointer] if found else None
        if holder is None and path.exists():
            self._log_files(run_id, path)
            holder = f"runs:/{run_id}/{rel}"
        if md5 and holder:
            self._client.set_tag(run_id, pointer, holder)

    def _log_files(self, run_id: str, path: Path) -> None:
        """A file under its parent dir, a directory under itself, an HF model directory (or one
        inside ``path``) as an MLflow model: all at their path relative to the root."""
        rel = self._rel(path)
        if is_hf_model_dir(path):
            log_model(self._client, run_id, path, rel)
        elif holds_hf_models(path):
            for child in sorted(path.iterdir()):
                self._log_files(run_id, child)
        elif path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path=rel)
        elif path.is_file():
            parent = Path(rel).parent.as_posix()
            self._client.log_artifact(run_id, str(path), None if parent == "." else parent)

    @_safe
    def end_pipeline(self, status: str = "FINISHED") -> None:
        """Terminate the parent run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self._parent:
            self._client.set_terminated(self._parent, status=status)
