"""The alignment data on disk: sampled groups and preference pairs as Parquet tables."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from beyondlm.align.data import PrefPair
from beyondlm.inputs import read_parquet, restore_fix


def save_groups(path: Path, prompt_ids, completions, ref_logps: np.ndarray, oracle: np.ndarray | None) -> None:
    import datasets

    cols = {"prompt_id": list(range(len(prompt_ids))), "prompt_ids": [list(p) for p in prompt_ids],
            "completions": completions, "ref_logps": ref_logps.tolist()}
    if oracle is not None:
        cols["oracle"] = oracle.tolist()
    datasets.Dataset.from_dict(cols).to_parquet(str(path))


def load_table(path: Path) -> dict:
    return read_parquet(path, restore_fix(path))


def save_pairs(path: Path, pairs: Sequence[PrefPair], split: Sequence[str], extra: Mapping | None = None) -> None:
    import datasets

    cols = {k: [getattr(p, k) for p in pairs] for k in PrefPair.__dataclass_fields__}
    datasets.Dataset.from_dict({**cols, "split": list(split), **(extra or {})}).to_parquet(str(path))


def load_pairs(path: Path, split: str) -> list[PrefPair]:
    t = load_table(path)
    keys = list(PrefPair.__dataclass_fields__)
    return [PrefPair(*(t[k][i] for k in keys)) for i, s in enumerate(t["split"]) if s == split]
