"""Crash-safe writes: every output is written beside its destination, then renamed into place.

A stage killed half-way leaves either the previous complete file/directory or none, never a
half-written one (``os.replace`` is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success move it onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was SIGKILLed
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():
            # Directories cannot be replaced atomically over a non-empty target: move the old
            # one aside first, then drop it once the new one is in place.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy/torch scalars to Python numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tsv(path: str | Path, rows: list[dict]) -> None:
    """Rows of one schema (the first row's keys) as a tab-separated table; None → empty cell."""
    cols = list(rows[0]) if rows else []

    def fmt(v) -> str:
        if v is None:
            return ""
        real = isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)  # numpy floats too
        return f"{v:.6g}" if real else str(v)

    write_text(path, "\n".join(["\t".join(cols)] + ["\t".join(fmt(r.get(c)) for c in cols) for r in rows]) + "\n")


# Run facts that differ between two runs of the same work. They must not enter a DVC-tracked
# out or metric (its hash would change, and everything downstream would go stale), so
# ``write_metrics`` moves them into an untracked sibling tree that the MLflow mirror reads.
TIMING_KEYS = frozenset({"wall_s", "tokens_per_s", "keys_per_s", "build_seconds", "seconds",
                         "resumed_from", "host", "load_avg"})


def timing_path(metrics_path: str | Path) -> Path:
    """``reports/metrics/<rest>`` -> ``reports/timing/<rest>``; elsewhere ``<name>.timing.json``."""
    path = Path(metrics_path)
    parts = path.parts
    if "metrics" in parts[:-1]:
        i = len(parts) - 2 - parts[:-1][::-1].index("metrics")  # the last 'metrics' directory
        return Path(*parts[:i], "timing", *parts[i + 1:])
    return path.with_name(f"{path.stem}.timing.json")


def split_timing(data: Any) -> tuple[Any, dict]:
    """(``data`` without the keys in :data:`TIMING_KEYS`, those keys as a nested dict)."""
    if not isinstance(data, dict):
        return data, {}
    kept, timing = {}, {}
    for key, value in data.items():
        if key in TIMING_KEYS:
            timing[key] = value
            continue
        kept[key], inner = split_timing(value)
        if inner:
            timing[key] = inner
    return kept, timing


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics JSON (DVC-tracked, same bytes for the same work) and, beside it under
    ``reports/timing/``, its wall times and rates (untracked; the MLflow mirror logs them)."""
    kept, timing = split_timing(metrics)
    write_json(path, kept)
    if timing:
        write_json(timing_path(path), timing)
