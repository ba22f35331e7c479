"""Checked readers: a broken input ends in one line naming the file, what is wrong and the fix.

``fix`` defaults to :func:`restore_fix`: most inputs are outputs of an earlier stage. Each reader
leaves the parsing to its library and turns the library's exception (``StopIteration``,
``BadGzipFile``, ``ArrowInvalid``, ``SafetensorError: header too large``, ...) into
:class:`InputError`, chained with ``from err``. ``beyondlm.cli.run`` prints it as ``error: ...``
and exits 2. This module imports no other ``beyondlm`` module (config.py may import it).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator


class InputError(Exception):
    """``<path>: <what is wrong>; <fix>``, always one line."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path, self.fix = Path(path), fix
        super().__init__(" ".join(f"{path}: {problem}; {fix}".split()))


def restore_fix(path: str | Path, stage: str | None = None) -> str:
    """The fix for a pipeline output: rerun the stage that writes it, or restore it from DVC's cache."""
    return f"rerun the producing stage: `dvc repro{' ' + stage if stage else ''}`, or `dvc checkout --force {path}`"


def _reason(err: BaseException) -> str:
    """The root cause's message (datasets wraps the parser's error), at most 200 characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, StopIteration):  # what a parser raises on input without a single record
        return "no data"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str | None = None) -> Iterator[None]:
    """Any error of the library read inside the block becomes ``<path>: not a readable <what> (<cause>); <fix>``."""
    fix = fix or restore_fix(path)
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # the block holds one library read: whatever it raises means a bad file
        raise InputError(path, f"not a readable {what} ({_reason(err)})", fix) from err


def require(path: str | Path, what: str, fix: str | None = None) -> Path:
    """``path`` if it exists (and, for a file, is not empty); else InputError."""
    path, fix = Path(path), fix or restore_fix(path)
    if not path.exists():
        raise InputError(path, f"{what} does not exist", fix)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, f"{what} is empty", fix)
    return path


# ----------------------------------------------------------------------------- text and tables
def read_json(path: str | Path, fix: str | None = None) -> Any:
    """A JSON file (metrics, meta, weights); the error names the line and column."""
    path = require(path, "JSON file", fix)
    with reading(path, "JSON file", fix):
        return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: str | Path, fix: str | None = None) -> list:
    """The objects of a JSON-lines file (optionally .gz); a bad line is named by its number."""
    path = require(path, "JSON-lines file", fix)
    rows = []
    with reading(path, "JSON-lines file", fix):
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not (line := line.strip()):
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    problem = f"line {n} is not valid JSON ({err.msg} at column {err.colno})"
                    raise InputError(path, problem, fix) from err
    return rows


def read_parquet(path: str | Path, fix: str | None = None) -> dict[str, list]:
    """A Parquet table as ``{column: values}`` (pyarrow)."""
    import pyarrow.parquet as pq

    path = require(path, "Parquet file", fix)
    with reading(path, "Parquet file", fix):
        return pq.read_table(path).to_pydict()


def load_parquet_split(path: str | Path, fix: str | None = None):
    """A prepared split as a ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets

    path = require(path, "Parquet split", fix)
    with reading(path, "Parquet split", fix):
        return datasets.Dataset.from_parquet(str(path))


def require_columns(path: str | Path, columns, wanted, fix: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (columns: {', '.join(columns)})", fix)


# ----------------------------------------------------------------------------- models and indexes
def check_safetensors(path: str | Path, fix: str | None = None) -> None:
    """The header of a safetensors file parses and its tensors cover the file (catches truncation)."""
    from safetensors import safe_open

    path = require(path, "safetensors file", fix)
    with reading(path, "safetensors file", fix), safe_open(str(path), "pt"):
        pass


def check_torch_file(path: str | Path, fix: str | None = None) -> None:
    """A ``torch.save`` zip archive is whole: central directory present, every entry's CRC matches."""
    path = require(path, "torch state file", fix)
    with reading(path, "torch state file", fix), zipfile.ZipFile(path) as archive:
        if (bad := archive.testzip()) is not None:
            raise ValueError(f"CRC mismatch in {bad}")


def check_model_dir(path: str | Path, fix: str | None = None) -> Path:
    """A saved HF model directory: ``config.json`` and readable ``*.safetensors`` weights."""
    fix = fix or restore_fix(path)  # of the directory: DVC restores it whole
    path = require(path, "model directory", fix)
    require(path / "config.json", "model config", fix)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(path, "no model.safetensors in the model directory", fix)
    for file in weights:
        check_safetensors(file, fix)
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_pretrained of a fast tokenizer writes


def load_tokenizer(path: str | Path, fix: str | None = None):
    """``AutoTokenizer`` from a saved directory. Without ``tokenizer_config.json`` transformers
    silently builds an empty GPT-2 tokenizer from ``config.json``, so both files are required."""
    from transformers import AutoTokenizer

    fix = fix or restore_fix(path)
    path = require(path, "tokenizer directory", fix)
    for name in TOKENIZER_FILES:
        require(path / name, "tokenizer file", fix)
    with reading(path / "tokenizer.json", "tokenizer", fix):
        return AutoTokenizer.from_pretrained(path)


def read_faiss_index(path: str | Path, fix: str | None = None):
    import faiss

    path = require(path, "faiss index", fix)
    with reading(path, "faiss index", fix):
        return faiss.read_index(str(path))


def load_npy(path: str | Path, fix: str | None = None):
    """A ``.npy`` array, memory-mapped read-only."""
    import numpy as np

    path = require(path, "numpy array file", fix)
    with reading(path, "numpy array file", fix):
        return np.load(path, mmap_mode="r")
