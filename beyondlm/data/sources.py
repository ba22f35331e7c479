"""Text sources for ``prepare``: local files and hub data sets, loaded through ``datasets``.

Both return ``{"train": [...], "valid": [...], "test": [...]}`` lists of non-empty strings. Missing
files and columns and empty splits raise :class:`ConfigError`, an unreadable file (empty, bad gzip,
a line that is not JSON, ...) :class:`~beyondlm.inputs.InputError`; both name the file and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from beyondlm.config import ConfigError
from beyondlm.data.config import HubSourceConfig, LocalSourceConfig
from beyondlm.inputs import read_jsonl, reading, require

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_text(text: str) -> str:
    """IMDB's HTML line breaks (``<br />``) become newlines, as the EXO paper reads aclImdb; stripped."""
    return _BR.sub("\n", text).strip()


# suffix → (datasets builder, extra kwargs)
_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


def builder(path: Path, key: str = "prepare.local") -> tuple[str, dict]:
    """The ``datasets`` builder and its kwargs for a local file, by suffix (``key``: the param naming it)."""
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        raise ConfigError(
            f"{key}: cannot read '{path}': unknown format; use one of "
            f"{', '.join(_BUILDERS)} (optionally compressed)"
        )
    return _BUILDERS[suffixes[-1]]


def read_text_file(path: str | Path, text_column: str, key: str) -> list[str]:
    """All non-empty texts of ``text_column`` in one local file (``text`` for .txt files)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"prepare.local.{key}: file '{path}' does not exist")
    builder_name, kwargs = builder(path)
    fix = f"fix the file, or set prepare.local.{key} to another one"
    fmt = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    require(path, f"{fmt} file", fix)
    with reading(path, f"{fmt} file", fix):
        try:
            ds = datasets.load_dataset(builder_name, data_files=str(path), split="train", **kwargs)
        except Exception:
            if fmt == "jsonl":
                read_jsonl(path, fix)  # names the first line that is not JSON, if that is the cause
            raise
    column = "text" if builder_name == "text" else text_column
    if column not in ds.column_names:
        raise ConfigError(
            f"prepare.local.text_column='{text_column}' is not a column of '{path}' "
            f"(columns: {', '.join(ds.column_names)}); set prepare.local.text_column"
        )
    return _clean(ds[column], f"'{path}'")


def _clean(values, where: str) -> list[str]:
    """Non-empty texts, stripped, HTML line breaks (IMDB's ``<br />``) as newlines."""
    texts = [t for t in (clean_text(v) for v in values if isinstance(v, str)) if t]
    if not texts:
        raise ConfigError(f"{where} has no non-empty texts")
    return texts


def split_off(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Move a seeded random ``fraction`` (at least one text) of ``texts`` into a held-out split."""
    if len(texts) < 2:
        raise ConfigError(f"need at least 2 texts to carve a held-out split, got {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_out = max(1, int(round(fraction * len(texts))))
    held = [texts[i] for i in order[:n_out]]
    kept = [texts[i] for i in order[n_out:]]
    return kept, held


def load_local(cfg: LocalSourceConfig, seed: int) -> dict[str, list[str]]:
    if not cfg.train:
        raise ConfigError("prepare.source=local needs prepare.local.train: a path to a text file")
    train = read_text_file(cfg.train, cfg.text_column, "train")
    return _fill_splits(train, cfg.valid, cfg.test, cfg, seed, lambda p, k: read_text_file(p, cfg.text_column, k))


def load_hub(cfg: HubSourceConfig, seed: int) -> dict[str, list[str]]:
    """``datasets.load_dataset(cfg.name, cfg.config, revision=...)``; needs network or a cache."""
    import datasets

    if not cfg.name:
        raise ConfigError("prepare.source=hub needs prepare.hub.name: a data set id on the hub")
    extra = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    # an id the hub does not have, a wrong config or revision: one line (stages/prepare.py checked
    # before, from local facts, that the id is cached or the hub reachable)
    fix = "check prepare.hub.name, .config and .revision, or set prepare.source: local (files under inputs/prepare/)"
    with reading(cfg.name, "hub data set", fix):
        dsd = datasets.load_dataset(cfg.name, cfg.config, revision=cfg.revision, **extra)

    def read(split: str, key: str) -> list[str]:
        if split not in dsd:
            raise ConfigError(
                f"prepare.hub.{key}='{split}' is not a split of {cfg.name} "
                f"(splits: {', '.join(dsd)}); set it or null to carve it from train"
            )
        if cfg.text_column not in dsd[split].column_names:
            raise ConfigError(
                f"prepare.hub.text_column='{cfg.text_column}' is not a column of {cfg.name} "
                f"(columns: {', '.join(dsd[split].column_names)})"
            )
        return _clean(dsd[split][cfg.text_column], f"{cfg.name}[{split}]")

    train = read(cfg.train_split, "train_split")
    return _fill_splits(train, cfg.valid_split, cfg.test_split, cfg, seed, read)


def _fill_splits(train, valid_ref, test_ref, cfg, seed, read) -> dict[str, list[str]]:
    """Read the valid/test references, or carve them out of train when they are null."""
    splits = {}
    if test_ref:
        splits["test"] = read(test_ref, "test")
    else:
        train, splits["test"] = split_off(train, cfg.test_fraction, seed)
    if valid_ref:
        splits["valid"] = read(valid_ref, "valid")
    else:
        train, splits["valid"] = split_off(train, cfg.valid_fraction, seed + 1)
    splits["train"] = train
    return splits
