"""Hub ids checked before any download: a param naming a model, tokenizer or data set is a local
path, or in the Hugging Face cache, or the hub is reachable; otherwise one ConfigError line.

Without this check an unreachable hub costs ~30 s of retries and a traceback (huggingface_hub
retries a failed HEAD request with backoff) before transformers says it found nothing. The
decision uses local facts only: the path on disk, the cache directory, ``HF_HUB_OFFLINE``, and a
connection probe bounded by :data:`PROBE_TIMEOUT_S` (run in a daemon thread, so even a name
lookup that hangs cannot hold the stage). When the hub is unreachable, :func:`check_hub_id`
switches the process to offline mode (``HF_HUB_OFFLINE=1`` and the constants transformers and
datasets read at call time), so a cached id loads from the cache without the retries.

The base layer's level: it imports only :mod:`beyondlm.config`.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from beyondlm.config import ConfigError

PROBE_TIMEOUT_S = 1.0  # a TCP connect to the hub takes ~0.1 s where it is reachable


def offline_env() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is set true."""
    truthy = {"1", "ON", "YES", "TRUE"}
    return any((os.environ.get(k) or "").upper() in truthy
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup
    included: the connect runs in a daemon thread that is abandoned at the deadline)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    ok = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.2)
    return ok.is_set()


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False under ``HF_HUB_OFFLINE``, else the probe's answer (asked once per process)."""
    if offline_env():
        return False
    from huggingface_hub import constants

    return probe(constants.ENDPOINT)


def go_offline() -> None:
    """Make every later hub call of this process local-only (no retries against an unreachable hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # huggingface_hub.is_offline_mode(), which transformers asks
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def in_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether ``repo_id`` has a snapshot in the hub cache (or, a data set, a prepared copy in the
    ``datasets`` cache, which ``load_dataset`` uses offline)."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if kind == "dataset":
        import datasets.config

        prepared = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
        return prepared.is_dir() and any(prepared.iterdir())
    return False


def _is_repo_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        return False  # a path, whatever validate_repo_id thinks of it
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_hub_id(key: str, value: str | None, kind: str = "model", fix: str = "") -> None:
    """ConfigError unless ``value`` (params key ``key``) can be loaded without a failing download:
    unset, an existing local path, a hub id in the cache, or a hub id while the hub is reachable.
    ``kind``: the repo type, model (tokenizers too) or dataset. ``fix``: the section's own way out
    (e.g. "or set prepare.source: local"). An unreachable hub
    switches the process offline (:func:`go_offline`)."""
    if not value or Path(value).expanduser().exists():
        return
    what = "data set" if kind == "dataset" else "model"
    if not _is_repo_id(value):
        raise ConfigError(f"params.yaml: '{key}'={value!r} does not exist (not a local path) and is not a hub "
                          f"id; set it to an existing {what} directory{' ' + fix if fix else ''}")
    if hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if offline_env() else "the hub is unreachable"
    go_offline()
    if not in_cache(value, kind):
        from huggingface_hub import constants

        raise ConfigError(
            f"params.yaml: '{key}'={value!r} is not a local directory and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}; set it to a local {what} directory (under inputs/), "
            f"{fix + ', ' if fix else ''}or download it once where the hub is reachable")
