"""Shared helpers of the report sections: reading metrics files, formatting, saving figures."""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from beyondlm import inputs  # noqa: E402
from beyondlm.io import atomic_path  # noqa: E402

RUN = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def get(d: dict | None, dotted: str) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``; None where any part is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


METRICS_FIX = "rerun the stage that writes it: `dvc repro` (a changed metrics file makes its stage stale)"


# Which files the report may read (beyondlm.report.provenance: outputs of the current dvc.lock);
# None = every file (the report built outside a DVC workspace, e.g. in tests).
_CURRENT: ContextVar[Callable[[Path], bool] | None] = ContextVar("current_outputs", default=None)


@contextmanager
def reading_only(is_current: Callable[[Path], bool] | None) -> Iterator[None]:
    """Within it, the readers below skip every file ``is_current`` refuses (as if absent)."""
    token = _CURRENT.set(is_current)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def readable(path: Path) -> bool:
    """``path`` exists and, inside :func:`reading_only`, is a current output."""
    return path.exists() and ((check := _CURRENT.get()) is None or check(path))


def read_json(path: Path) -> dict | None:
    """The parsed file, or None when it does not exist (a stage that has not run) or is not current."""
    return inputs.read_json(path, METRICS_FIX) if readable(path) else None


def load_json_dir(directory: Path) -> dict[str, dict]:
    """``{stem: parsed}`` of every readable ``*.json`` in ``directory`` (sorted; empty when absent)."""
    return {p.stem: inputs.read_json(p, METRICS_FIX) for p in sorted(directory.glob("*.json")) if readable(p)}


def load_runs(directory: Path) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: metrics}}`` from the readable ``<directory>/<variant>-s<seed>.json``."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(directory.glob("*.json")):
        if (m := RUN.match(path.stem)) and readable(path):
            runs[m["variant"]][int(m["seed"])] = inputs.read_json(path, METRICS_FIX)
    return dict(runs)


def mean_std(values: list, fmt: str, *, se: bool = False) -> str:
    """``mean ± std`` (ddof=1) of the non-None values (``se``: ± std/√n, two significant digits);
    one value alone; "–" for none."""
    if fmt == "s":  # a label: the same for every seed
        return str(next((v for v in values if v is not None), "–"))
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return "–"
    if vals.size == 1:
        return f"{vals[0]:{fmt}}"
    if se:
        return f"{vals.mean():{fmt}} ± {vals.std(ddof=1) / np.sqrt(vals.size):.2g}"
    return f"{vals.mean():{fmt}} ± {vals.std(ddof=1):{fmt}}"


def fmt(x, spec: str) -> str:
    return "–" if x is None else f"{x:{spec}}"


def save_fig(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def image(title: str, png: Path | None, reports: Path) -> list[str]:
    """Markdown lines showing ``png`` (relative to the report), or nothing when there is none."""
    return [] if png is None else [f"![{title}]({png.relative_to(reports).as_posix()})", ""]
